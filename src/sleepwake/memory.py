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

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import AbstractSet, Any, Iterable, Sequence

import torch

from sleepwake.backends import check_backend
from sleepwake.config import MemoryConfig, default_cache_dir, default_home
from sleepwake.corpus import perplexity_text
from sleepwake.errors import (
    InvalidFactError,
    InvalidRequestError,
)
from sleepwake.evaluate import EvalReport, cached_perplexity, evaluate_facts, held
from sleepwake.export import export_adapter
from sleepwake.facts import Fact
from sleepwake.inference import chat_text, encode, generate
from sleepwake.keyed import KeyedMemory, install, is_keyed_file
from sleepwake.memory_base import MemoryBase, uses_model
from sleepwake.memit.covariance import load_or_compute
from sleepwake.memit.editor import FactEdit, InjectStats, MemitEditor
from sleepwake.models import LoadedModel, load_model
from sleepwake.placement import DeviceMap
from sleepwake.policy import edit_group, shares_edit
from sleepwake.sleep.lora import Adapter
from sleepwake.store import Store
from sleepwake.users import check_user, user_home
from sleepwake.weights import Factor, LiveWeights
from sleepwake.writes import (  # noqa: F401  (their home was here: importable from here too)
    MAX_PROMPT_CHARS,
    WARM_FROM,
    FactLike,
    InjectResult,
    Writes,
    as_facts,
    check_text,
)

def _per_layer(edits: Sequence[FactEdit]) -> dict[int, Factor]:
    """The MEMIT deltas of `edits` summed per layer, as one (A, B) pair each."""
    out: dict[int, Factor] = {}
    for layer in sorted({l for e in edits for l in e.a}):
        parts = [(e.a[layer], e.b[layer]) for e in edits if layer in e.a]
        out[layer] = (torch.cat([a for a, _ in parts], dim=1), torch.cat([b for _, b in parts]))
    return out


class Memory(Writes, MemoryBase):
    """A language model with a memory in its weights, persisted under `home`.

    `user` names whose memory of the home this is (see `sleepwake.users`): memories of
    several users may share one `LoadedModel`, each making its own weights live before
    it uses the model (`activate`). `quantize="nf4"` loads the model's decoder in 4-bit
    (`sleepwake.quantize`); what it learns stays in float32 beside the 4-bit weights.
    `device_map="auto"` (or a dict, as transformers takes it) places the model over all
    visible GPUs with accelerate (`sleepwake.placement`); each layer's memory lives on its GPU.
    `backend="mlx"` gives the same memory on MLX arrays (`sleepwake.mlx.memory.MlxMemory`),
    reading and writing the same home."""

    backend = "torch"

    def __new__(cls, *args: Any, backend: str | None = None, **kwargs: Any) -> Any:
        if check_backend(backend) == "torch":
            return super().__new__(cls)
        device, quantize = kwargs.pop("device", None), kwargs.pop("quantize", None)
        if quantize is not None:
            raise InvalidRequestError("quantize is not supported by the MLX backend (it loads float32)")
        if kwargs.pop("device_map", None) is not None:
            raise InvalidRequestError("device_map is not supported by the MLX backend (one device: Metal or the CPU)")
        if device not in (None, "auto"):
            raise InvalidRequestError(f"device={device!r}: the MLX backend chooses its own device (Metal or the CPU)")
        from sleepwake.mlx.memory import MlxMemory

        return MlxMemory(*args, **kwargs)

    def __init__(
        self,
        model: str | os.PathLike[str] | LoadedModel | None = None,
        home: str | os.PathLike[str] | None = None,
        *,
        config: MemoryConfig | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        device: str | torch.device | None = None,
        progress: bool | None = None,
        user: str | None = None,
        quantize: str | None = None,
        backend: str | None = None,
        device_map: DeviceMap | None = None,
    ) -> None:
        self.user = check_user(user)  # before anything loads or changes
        if isinstance(model, LoadedModel) and quantize is not None and quantize != model.quantize:
            raise InvalidRequestError(f"quantize={quantize!r}, but the model given was loaded with "
                                      f"quantize={model.quantize!r}")
        if isinstance(model, LoadedModel) and device_map is not None:
            raise InvalidRequestError("device_map is for a model Memory loads; the model given is placed already")
        self.root = root = Path(home).expanduser() if home is not None else default_home()  # all users' home
        self.config = config or MemoryConfig()
        self.progress = self.config.progress if progress is None else progress
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.lm = model if isinstance(model, LoadedModel) else load_model(
            model, cache_dir=self.cache_dir, device=device, progress=self.progress, quantize=quantize,
            device_map=device_map,
        )
        self.layers = tuple(self.config.memit.layers or self.lm.default_layers())
        bad = [l for l in self.layers if not 0 <= l < self.lm.arch.n_layers]
        if bad:
            raise InvalidFactError(f"layers {bad} out of range: the model has {self.lm.arch.n_layers} layers")
        for l in self.layers:  # before the home is touched: a layer a device_map offloaded cannot be edited
            self.lm.arch.check_writable(self.lm.arch.down_name(l))
        # Taking the home's lock: `HomeBusyError` names the live process that writes it.
        self.store = Store(user_home(root, self.user), self.lm.fingerprint, self.lm.name, lock_home=root)
        self._live_at: int | None = None  # `lm.weights_version` when this memory last wrote the model
        self._installed: tuple[Any, dict[int, Factor]] = (None, {})  # what `_rebuild` gave `keyed.install`
        self._depth = 0  # calls of this memory under way (`_live`): only the outermost activates
        try:
            self.interrupted = self.store.mark_interrupted()  # sleeps a dead process left unfinished
            self._edits: dict[int, FactEdit] = self._load_edits()
            self._suspended: set[object] = set()  # subjects being edited now: their keyed entries are off
            self._load_consolidated()
            edited = set(self.layers).union(*(e.a.keys() for e in self._edits.values()))
            with self.lm.lock:  # other users of a shared model may be using it
                self.weights = LiveWeights(self.lm, [self.lm.arch.down_name(l) for l in sorted(edited)])
                self._rebuild()
        except BaseException:
            self.store.close()
            raise
        self._editor: MemitEditor | None = None
        self._covariances: dict[int, torch.Tensor] | None = None
        self._ppl: tuple[int, float] | None = None  # (weights version, perplexity)
        # (weights version, chat, {fact key: answered}) from the last guard check (`_edit_guarded`)
        self._answered: tuple[int, bool, dict[tuple[str, str], bool]] | None = None
        self._unheld: dict[tuple[str, str], int] = {}  # fact key -> id of a MEMIT fact found unanswered
        self._edit_missing()

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

    def covariances(self) -> dict[int, torch.Tensor]:
        """Ĉ per edited layer (computed once per model, then cached on disk)."""
        key = ("covariances", self.layers, self.config.memit.cov_texts, self.config.memit.cov_max_tokens)
        if self._covariances is None and key in self.lm.shared:  # another user's memory loaded them
            self._covariances = self.lm.shared[key]
        if self._covariances is None:
            self._covariances = self.lm.shared[key] = load_or_compute(
                self.model, self.lm.arch, self.tokenizer, self.layers,
                fingerprint=self.lm.fingerprint, cache_dir=self.cache_dir,
                n_texts=self.config.memit.cov_texts, max_tokens=self.config.memit.cov_max_tokens,
                progress=self.progress,
            )
        return self._covariances

    def editor(self) -> MemitEditor:
        """The MEMIT editor, built on first use."""
        if self._editor is None:
            covariances = self.covariances()
            # One inverse per model for all its users' editors (150 MB on SmolLM2-135M with Ĉ),
            # computed by the first (3.6 s on one thread).
            key = ("cov_inv", self.layers, id(covariances))
            self._editor = MemitEditor(self.model, self.lm.arch, self.tokenizer, self.layers, covariances,
                                       self.config.memit, weights=self.weights, cov_inv=self.lm.shared.get(key))
            self.lm.shared.setdefault(key, self._editor.cov_inv)
        return self._editor

    # --- memory ---------------------------------------------------------------

    def _factors(self, edits: Sequence[FactEdit], adapters: Sequence[Adapter]) -> dict[str, list[Factor]]:
        """The deltas that make the live weights, in their canonical order: the
        consolidated adapters by cycle, then the MEMIT edits by fact id."""
        out: dict[str, list[Factor]] = {}
        for part in [*(a.factors() for a in adapters), *(e.factors(self.lm.arch) for e in edits)]:
            for name, f in part.items():
                out.setdefault(name, []).append(f)
        return out

    def _load_consolidated(self) -> None:
        """The consolidated memory as the ledger has it: LoRA adapters (from earlier
        versions, or `consolidation="lora"`) and the newest keyed table; each module's
        part on its device."""
        arch = self.lm.arch
        active = self.store.active_adapters()
        self._adapters: list[Adapter] = [Adapter.load(p, arch.device) for _, p in active if not is_keyed_file(p)]
        tables = [p for _, p in active if is_keyed_file(p)]
        self._keyed: KeyedMemory | None = KeyedMemory.load(tables[-1], arch.layer_device) if tables else None

    def _rebuild(self, edits: Sequence[FactEdit] | None = None, adapters: Sequence[Adapter] | None = None,
                 keyed: KeyedMemory | None | str = "live") -> None:
        """Live model = base + `adapters` + `edits`, reading `keyed` (default: the
        committed state, with the keyed entries that are live, `keyed_live`)."""
        if edits is None and adapters is None and keyed == "live":
            self._suspended = set()
        if edits is None:
            edits = [self._edits[i] for i in sorted(self._edits)]
        self.weights.rebuild(self._factors(edits, self._adapters if adapters is None else adapters))
        self._installed = (self.keyed_live() if keyed == "live" else keyed, _per_layer(edits))
        install(self.lm, *self._installed)
        self._live_at = self.lm.weights_version

    # --- users sharing one model ---------------------------------------------------

    def activate(self) -> None:
        """Make this memory's weights the live ones of its model, if they are not: another
        memory (another user) on the same model may have written its own since. Cheap when
        they are live (a counter); else the edited modules are written back from their
        delta sums and the keyed hooks put back. Call it holding `lm.lock`; every method
        that uses the model does so itself."""
        if self._live_at == self.lm.weights_version:
            return
        if self._live_at is None:  # unknown state (a failed call, a sleep apart): rebuild whole
            self._rebuild()
            return
        _put_back(self.lm, self.weights, self._installed)
        self._live_at = self.lm.weights_version

    def snapshot(self) -> Callable[[], None]:
        """A function that makes the weights live now live again on this model, called
        holding `lm.lock`: what this user's replies read while a sleep runs `apart`."""
        self.activate()
        lm, weights, installed, at = self.lm, self.weights, self._installed, [self.lm.weights_version]

        def put_back() -> None:
            if lm.weights_version != at[0]:
                _put_back(lm, weights, installed)
                at[0] = lm.weights_version

        return put_back

    @contextlib.contextmanager
    def apart(self) -> Iterator[None]:
        """Within the block this memory works on a private copy of its model
        (`LoadedModel.private_copy`), so a sleep changes no weights that other users of
        the model read; after it, its new weights go live on the shared model at its next
        use. Only this memory's own calls may run within the block (it is its sleep's)."""
        shared, names = self.lm, self.weights.names
        with shared.lock:
            self.activate()
            private = shared.private_copy()
        self.lm, self.weights, self._editor, self._ppl, self._answered = (
            private, LiveWeights(private, names), None, None, None)
        try:
            with private.lock:
                self._rebuild()
            yield
        finally:
            self.lm, self._editor, self._ppl, self._answered = shared, None, None, None
            self.weights = LiveWeights(shared, self.weights.names)  # a snapshot may still read the old one
            self._live_at = None

    def edit_among(self, facts: list[Fact], fixed: list[FactEdit], leaving: AbstractSet[int] = frozenset(),
                   progress: bool = False, *, chat: bool, init: dict[str, torch.Tensor] | None = None
                   ) -> tuple[list[FactEdit], InjectStats]:
        """MEMIT edits of `facts` on the live weights, one per fact, keeping the keys of
        `fixed` and of the consolidated facts (but those in `leaving`) fixed (eq. 5): their
        adapters read the same keys, and a new edit must not write over them. `chat`: also
        edit for the chat questions (`chat_edits`).

        A consolidated fact of the same edit group as a fact edited now (with subject keys:
        about the same subject) is read at the same key, which cannot both stay fixed and
        change. It is carried instead: edited again along with them, so that it keeps its
        answer, and its edit becomes part of the first new edit of its group (which a
        later sleep takes over whole, and a forget removes whole, giving the fact back to
        its adapter)."""
        groups = {edit_group(f, self.config.memit) for f in facts}
        held = [r for r in self.store.facts(where="consolidated") if r.id not in leaving]
        carried = [r for r in held if edit_group(r.fact, self.config.memit) in groups]
        device = self.lm.arch.layer_device
        if self.lm.keyed is not None:  # their entries are off while they are edited (and in MEMIT after)
            self._suspended |= groups
            install(self.lm, self.lm.keyed.without(sorted(str(g) for g in groups)), _per_layer(fixed))
        # Consolidated facts still in weights (LoRA) keep their keys fixed; keyed ones have no weights.
        keyed_cycles = self._keyed_cycles()  # once: it reads every cycle of the ledger
        in_weights = [r for r in held if r.cycle is None or r.cycle not in keyed_cycles]
        fixed = fixed + [self.store.load_edit(r.id, device) for r in in_weights
                         if edit_group(r.fact, self.config.memit) not in groups]
        edits, stats = self.editor().edit(facts + [r.fact for r in carried], fixed, progress=progress, chat=chat,
                                          init=init)
        own = edits[: len(facts)]
        for r, e in zip(carried, edits[len(facts):]):
            first = next(i for i, f in enumerate(facts) if shares_edit(f, r.fact, self.config.memit))
            own[first] = own[first].joined(e)
        return own, stats

    def _load_edits(self) -> dict[int, FactEdit]:
        """The stored edits of the MEMIT-held facts (those that have one, `_edit_missing`)."""
        return {r.id: self.store.load_edit(r.id, self.lm.arch.layer_device) for r in self.store.facts(where="memit")
                if r.id in self._with_edit()}

    def export_adapter(self, path: str | os.PathLike[str], max_rank: int | None = None) -> Path:
        """Write the whole learned memory as one PEFT LoRA adapter directory (`export`)."""
        return export_adapter(self, path, max_rank)

    # --- using the model ------------------------------------------------------

    def complete(self, prompt: str, max_new_tokens: int | None = None) -> str:
        """Greedy raw continuation of `prompt` (the MEMIT pathway)."""
        prompt = self.as_written(check_text(prompt, "prompt"))
        n = max_new_tokens or self.config.generation.max_new_tokens
        return generate(self.model, self.tokenizer, [encode(self.tokenizer, prompt)], max_new_tokens=n)[0]

    def ask(self, question: str, max_new_tokens: int | None = None) -> str:
        """Greedy answer to `question` through the model's chat template."""
        question = check_text(question, "question")
        n = max_new_tokens or self.config.generation.max_new_tokens
        ids = encode(self.tokenizer, chat_text(self.tokenizer, question), chat=True)
        return generate(self.model, self.tokenizer, [ids], max_new_tokens=n)[0].strip()

    def evaluate(self, facts: FactLike | Iterable[FactLike]) -> EvalReport:
        """Raw and chat recall of `facts` (injected or not), perplexity, per-fact results."""
        report = evaluate_facts(self.model, self.tokenizer, as_facts(facts), None, progress=self.progress)
        report.ppl = self.perplexity()
        return report

    def held(self, facts: Sequence[Fact], chat: bool = True) -> list[bool]:
        """Whether the live model writes each fact's object after its prompt (and, with
        `chat`, its chat question): `evaluate.held`."""
        return held(self.model, self.tokenizer, facts, chat=chat)

    def perplexity(self) -> float:
        """Perplexity of the live model on the fixed reference text. Kept until the
        weights change (a nap asks several times on one state), and on disk for these
        exact weights (`evaluate.cached_perplexity`)."""
        version = self.lm.weights_version
        if self._ppl is None or self._ppl[0] != version:
            self._ppl = (version, cached_perplexity(self.lm, perplexity_text(), self.cache_dir))
        return self._ppl[1]

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Memory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _put_back(lm: LoadedModel, weights: LiveWeights, installed: tuple[Any, dict[int, Factor]]) -> None:
    """Write `weights` (base + their delta sums) and `installed` keyed hooks into `lm`;
    modules that other memories wrote and these do not carry go back to base."""
    weights.track(lm.written())
    weights.restore()
    install(lm, *installed)


# Every method that reads or writes the model (`status` reads it through `perplexity`).
for _name in ("covariances", "editor", "edit_among", "inject", "forget", "nap", "sleep", "rollback",
              "export_adapter", "base_perplexity", "gate_facts", "locality", "sleep_if_due", "complete", "ask",
              "evaluate", "perplexity", "held"):
    setattr(Memory, _name, uses_model(getattr(Memory, _name)))
