"""`Memory(backend="mlx")`: the memory of a home, on an MLX model.

The home is the PyTorch backend's, file for file: the ledger, one edit file of torch
safetensors per fact (the factors A, B, the keys K and δ), and the keyed tables. The live
weights are rebuilt from them the same way (base + the active edits' A·B in fact order,
summed by the same float32 product), so either backend answers a home the other wrote.

What runs here is the torch backend's own code above a few seams: injection and forgetting
(`writes.Writes`: batches, the guard's second try, raw-only re-edits past the chat-edit
limit, v*'s warm start, reconsolidation into the keyed memory, rollback), status and the
sleep pressure, naps and deep sleeps into the keyed memory or a LoRA adapter with their
perplexity and locality budget (`memory_base.MemoryBase`, `sleep.keyed_sleep`, `sleep.cycle`), and what
`talk.Assistant` and the server ask of a memory (`activate`, `snapshot`, `apart`,
`without`), for several users on one `MlxModel`. MLX's own: MEMIT's v*, Ĉ and keys
(`mlx.memit`), the live weights (`_rebuild`, `edit_among`), recall checks, generation and
perplexity, a LoRA sleep's training (`mlx.lora`); `export` writes the PyTorch names
(`mlx.model.TorchNames`), by which a home's LoRA adapters (either backend's sleep's) are read too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import AbstractSet, Any, Sequence

import mlx.core as mx
import torch

from sleepwake.config import MemoryConfig, default_cache_dir, default_home
from sleepwake.corpus import perplexity_text
from sleepwake.errors import InvalidFactError, UnsupportedError
from sleepwake.evaluate import EvalReport, FactResult, checked, kept_on_disk, weights_cache_path
from sleepwake.export import export_adapter
from sleepwake.facts import Fact, mentions
from sleepwake.inference import chat_text, encode, raw_prompt
from sleepwake.keyed import KeyedMemory, is_keyed_file
from sleepwake.memit.editor import FactEdit, InjectStats
from sleepwake.memory_base import MemoryBase, uses_model
from sleepwake.mlx.lora import MlxSleep
from sleepwake.mlx.memit import MlxEditor, covariances, to_mx
from sleepwake.mlx.model import KeyedTable, Live, MlxModel, load_mlx_model
from sleepwake.policy import edit_group, shares_edit
from sleepwake.sleep.lora import Adapter
from sleepwake.store import Store
from sleepwake.users import check_user, user_home
from sleepwake.writes import FactLike, Writes, as_facts, check_text


class MlxMemory(Writes, MemoryBase):
    """A model on MLX with a memory in its weights, persisted under `home` (see the module)."""

    backend = "mlx"
    lora_sleep = MlxSleep  # what a LoRA sleep runs on this backend's model (`sleep.cycle.LoraSleep`)

    def __init__(self, model: str | os.PathLike[str] | MlxModel | None = None,
                 home: str | os.PathLike[str] | None = None, *, config: MemoryConfig | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, progress: bool | None = None,
                 user: str | None = None) -> None:
        self.user = check_user(user)
        self.root = root = Path(home).expanduser() if home is not None else default_home()
        self.config = config or MemoryConfig()
        self.progress = self.config.progress if progress is None else progress
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.mm = model if isinstance(model, MlxModel) else load_mlx_model(model, cache_dir=self.cache_dir,
                                                                           progress=self.progress)
        self.store = Store(user_home(root, self.user), self.mm.fingerprint, self.mm.name, lock_home=root)
        self._live_at: int | None = None  # `mm.weights_version` when this memory last made its weights live
        self._depth = 0  # calls of this memory under way (`uses_model`): only the outermost activates
        self._unheld: dict[tuple[str, str], int] = {}  # fact key -> id of a MEMIT fact found unanswered
        self._answered: tuple[int, bool, dict[tuple[str, str], bool]] | None = None  # the guard's last check
        self._ppl: tuple[str, float] | None = None  # (weights digest, perplexity)
        self._editor: MlxEditor | None = None
        try:
            self.interrupted = self.store.mark_interrupted()  # sleeps a dead process left unfinished
            self.layers = tuple(self.config.memit.layers or self.mm.default_layers())
            bad = [l for l in self.layers if not 0 <= l < self.mm.n_layers]
            if bad:
                raise InvalidFactError(f"layers {bad} out of range: the model has {self.mm.n_layers} layers")
            self._edits: dict[int, FactEdit] = self._load_edits()
            self._suspended: set[object] = set()  # subjects being edited now: their keyed entries are off
            self._load_consolidated()
            with self.mm.lock:
                self._rebuild()
        except BaseException:
            self.store.close()
            raise
        self._edit_missing()

    @property
    def lm(self) -> MlxModel:
        """The loaded model, which other users' memories may share (`LoadedModel` on torch)."""
        return self.mm

    @property
    def model(self) -> MlxModel:
        """What replies run on (`decoding.Decoding` reads its `stream`)."""
        return self.mm

    @property
    def home(self) -> Path:
        return self.store.home

    @property
    def tokenizer(self) -> Any:
        return self.mm.tokenizer

    def covariances(self) -> dict[int, torch.Tensor]:
        """Ĉ per edited layer, from the cache the torch backend shares (`Memory.covariances`)."""
        return covariances(self.mm, self.layers, self.config.memit, self.cache_dir)

    def editor(self) -> MlxEditor:
        """The MEMIT editor, built on first use; its Ĉ⁻¹ is kept on the model for every
        memory made on it (`LoadedModel.shared` on torch)."""
        if self._editor is None:
            cfg = self.config.memit
            key = (self.layers, cfg.cov_texts, cfg.cov_max_tokens)
            if key not in self.mm.shared:
                self.mm.shared[key] = MlxEditor(self.mm, self.layers, self.covariances(), cfg).cov_inv
            self._editor = MlxEditor(self.mm, self.layers, None, cfg, cov_inv=self.mm.shared[key])
        return self._editor

    # --- the live weights --------------------------------------------------------

    def _load_edits(self) -> dict[int, FactEdit]:
        """The stored edits of the MEMIT-held facts (those that have one, `_edit_missing`)."""
        return {r.id: self.store.load_edit(r.id) for r in self.store.facts(where="memit") if r.id in self._with_edit()}

    def _load_consolidated(self) -> None:
        """The consolidated memory as the ledger has it: LoRA adapters (a torch sleep's,
        `consolidation="lora"`: on down-projections only) and the newest keyed table."""
        active = self.store.active_adapters()
        adapters = [Adapter.load(p) for _, p in active if not is_keyed_file(p)]
        other = sorted({n for a in adapters for n in a.names if self.mm.arch.layer_of(n) is None})
        if other:
            raise UnsupportedError(f"this home's LoRA adapters change {', '.join(other)}, which the MLX backend "
                                   "does not read (only down-projections): use the torch backend")
        self._adapters = adapters
        tables = [p for _, p in active if is_keyed_file(p)]
        self._keyed: KeyedMemory | None = KeyedMemory.load(tables[-1]) if tables else None

    def _rebuild(self, edits: Sequence[FactEdit] | None = None, adapters: Sequence[Adapter] | None = None,
                 keyed: KeyedMemory | None | str = "live") -> None:
        """Live model = base + `adapters` (default: the consolidated ones) + `edits`
        (default: the committed ones, in fact order), in that order as on torch, reading
        `keyed` (default: the live keyed entries)."""
        if edits is None and adapters is None and keyed == "live":
            self._suspended = set()
        if edits is None:
            edits = [self._edits[i] for i in sorted(self._edits)]
        parts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for adapter in self._adapters if adapters is None else adapters:
            for name, (a, b) in adapter.factors().items():
                parts.setdefault(self.mm.arch.layer_of(name), []).append((a.float(), b.float()))
        for layer, ab in _per_layer(edits).items():
            parts.setdefault(layer, []).append(ab)
        # One product of the factors side by side per layer, as `LiveWeights.rebuild`.
        self._sums = {l: torch.mm(torch.cat([a for a, _ in p], dim=1), torch.cat([b for _, b in p]))
                      for l, p in sorted(parts.items())}
        self._read(self.keyed_live() if keyed == "live" else keyed, edits)
        self._live = Live({l: to_mx(d) for l, d in self._sums.items()}, self.mm.taps.keyed, self.mm.taps.memit)
        self._live_at = self.mm.load(self._live)

    def _read(self, table: KeyedMemory | None, edits: Sequence[FactEdit]) -> None:
        """Make the model read the keyed `table`, with the MEMIT factors of `edits` taken
        back out where an entry reads (`keyed.install`)."""
        self._installed = table if table is not None and len(table) else None
        self.mm.taps.keyed = _table(self._installed) if self._installed is not None else None
        self.mm.taps.memit = {l: (to_mx(a), to_mx(b)) for l, (a, b) in _per_layer(edits).items()} \
            if self._installed is not None else {}

    def _add(self, layer: int, delta: torch.Tensor) -> None:
        """A layer's update while a batch is solved layer by layer."""
        self._sums[layer] = self._sums[layer] + delta if layer in self._sums else delta
        self.mm.set_delta(layer, to_mx(self._sums[layer]))

    def _digest(self) -> str:
        """A name for the weights live now: the model, the keyed table read, each delta sum."""
        h = hashlib.blake2b(self.mm.fingerprint.encode(), digest_size=16)
        h.update((self._installed.digest() if self._installed is not None else "").encode())
        for layer in sorted(self._sums):
            h.update(str(layer).encode())
            h.update(self._sums[layer].contiguous().numpy().tobytes())
        return h.hexdigest()

    # --- users sharing one model -----------------------------------------------------

    def activate(self) -> None:
        """Make this memory's weights the live ones of its model, if they are not (another
        user's memory may have made its own live since): `Memory.activate`."""
        if self._live_at != self.mm.weights_version:
            self._rebuild()

    def snapshot(self) -> Callable[[], None]:
        """A function that makes the weights live now live again on this model, called
        holding its lock: what this user's replies read while a sleep runs `apart`."""
        self.activate()
        mm, live, at = self.mm, self._live, [self.mm.weights_version]

        def put_back() -> None:
            if mm.weights_version != at[0]:
                at[0] = mm.load(live)

        return put_back

    @contextlib.contextmanager
    def apart(self) -> Iterator[None]:
        """Within the block this memory works on a private copy of its model (a sleep's),
        whose new weights go live on the shared model at its next use (`Memory.apart`)."""
        shared = self.mm
        with shared.lock:
            self.activate()
            private = shared.private_copy()
        self.mm, self._editor, self._ppl = private, None, None
        try:
            with private.lock:
                self._rebuild()
            yield
        finally:
            self.mm, self._editor, self._ppl = shared, None, None
            self._live_at = None

    # --- memory ------------------------------------------------------------------

    def edit_among(self, facts: list[Fact], fixed: list[FactEdit], leaving: AbstractSet[int] = frozenset(),
                   progress: bool = False, *, chat: bool, init: dict[str, torch.Tensor] | None = None
                   ) -> tuple[list[FactEdit], InjectStats]:
        """MEMIT edits of `facts` on the live weights, the keys of `fixed` held fixed (eq. 5),
        the subjects' keyed entries off; a consolidated fact of a subject edited now is
        carried along in its first new edit (`Memory.edit_among`)."""
        cfg = self.config.memit
        groups = {edit_group(f, cfg) for f in facts}
        held = [r for r in self.store.facts(where="consolidated") if r.id not in leaving]
        carried = [r for r in held if edit_group(r.fact, cfg) in groups]
        if self._installed is not None:  # their entries are off while they are edited (and in MEMIT after)
            self._suspended |= groups
            self._read(self._installed.without(sorted(str(g) for g in groups)), fixed)
        # Consolidated facts still in weights (LoRA) keep their keys fixed; keyed ones have no weights.
        keyed_cycles = self._keyed_cycles()  # once: it reads every cycle of the ledger
        in_weights = [r for r in held if r.cycle is None or r.cycle not in keyed_cycles]
        fixed = fixed + [self.store.load_edit(r.id) for r in in_weights if edit_group(r.fact, cfg) not in groups]
        edits, stats = self.editor().edit(facts + [r.fact for r in carried], fixed, self._add, chat=chat, init=init)
        own = edits[: len(facts)]
        for r, e in zip(carried, edits[len(facts):]):
            first = next(i for i, f in enumerate(facts) if shares_edit(f, r.fact, cfg))
            own[first] = own[first].joined(e)
        return own, stats

    # --- using the model -------------------------------------------------------------

    def held(self, facts: Sequence[Fact], chat: bool = True) -> list[bool]:
        """Whether greedy decoding writes each fact's object right after its prompt (and,
        with `chat`, its chat question): `evaluate.held` on MLX."""
        return checked(self.tokenizer, facts, chat, 32, self.mm.object_is_top)

    def perplexity(self) -> float:
        """Perplexity of the live model on the fixed reference text, kept until the weights
        change, and on disk for these weights (`evaluate.cached_perplexity`)."""
        digest = self._digest()
        if self._ppl is None or self._ppl[0] != digest:
            text = perplexity_text()
            path = weights_cache_path(f"{digest}|mlx|", text, self.cache_dir)
            self._ppl = (digest, kept_on_disk(path, lambda: self.mm.perplexity(encode(self.tokenizer, text))))
        return self._ppl[1]

    def complete(self, prompt: str, max_new_tokens: int | None = None) -> str:
        """Greedy raw continuation of `prompt` (the MEMIT pathway)."""
        prompt = self.as_written(check_text(prompt, "prompt"))
        return self.mm.generate(encode(self.tokenizer, prompt), max_new_tokens or self.config.generation.max_new_tokens)

    def ask(self, question: str, max_new_tokens: int | None = None) -> str:
        """Greedy answer to `question` through the model's chat template."""
        question = check_text(question, "question")
        ids = encode(self.tokenizer, chat_text(self.tokenizer, question), chat=True)
        return self.mm.generate(ids, max_new_tokens or self.config.generation.max_new_tokens).strip()

    def evaluate(self, facts: FactLike | Sequence[FactLike], max_new_tokens: int = 16) -> EvalReport:
        """Raw and chat recall of `facts` (`Memory.evaluate`; perplexity is `perplexity()`'s)."""
        facts = as_facts(facts)
        tok = self.tokenizer
        results = []
        for f in facts:
            raw = self.mm.generate(encode(tok, raw_prompt(tok, f)), max_new_tokens, until=f.object)
            chat = self.mm.generate(encode(tok, chat_text(tok, f.chat_question()), chat=True), max_new_tokens,
                                    until=f.object)
            results.append(FactResult(f.subject, f.relation, f.object, f.chat_question(), raw, mentions(raw, f.object),
                                      chat, mentions(chat, f.object)))
        n = len(results)
        return EvalReport(n, sum(r.raw_ok for r in results) / n, sum(r.chat_ok for r in results) / n, None, results)

    def export_adapter(self, path: str | os.PathLike[str], max_rank: int | None = None) -> Path:
        """Write the whole learned memory as one PEFT LoRA adapter directory (`Memory.export_adapter`)."""
        return export_adapter(self, path, max_rank)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "MlxMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Every method that reads or writes the model, as on torch (`memory_base.uses_model`).
for _name in ("covariances", "editor", "edit_among", "inject", "forget", "rollback", "export_adapter", "nap", "sleep", "base_perplexity", "gate_facts",
              "locality", "sleep_if_due", "complete", "ask", "evaluate", "perplexity", "held"):
    setattr(MlxMemory, _name, uses_model(getattr(MlxMemory, _name)))


def _per_layer(edits: Sequence[FactEdit]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The edits' factors per layer, side by side in fact order, in float32."""
    out = {}
    for layer in sorted({l for e in edits for l in e.a}):
        parts = [(e.a[layer], e.b[layer]) for e in edits if layer in e.a]
        out[layer] = (torch.cat([a for a, _ in parts], dim=1).float(), torch.cat([b for _, b in parts]).float())
    return out


def _table(memory: KeyedMemory) -> KeyedTable:
    """A keyed memory as the MLX taps read it (`KeyedMemory.table`)."""
    read, deltas, owner = memory.table("cpu")
    return KeyedTable(memory.layer, memory.match_layer, memory.threshold, memory.head_threshold,
                      to_mx(read.keys), to_mx(read.heads), read.backs.numpy(), to_mx(deltas),
                      mx.array(owner.numpy()))
