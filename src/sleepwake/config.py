"""One typed configuration tree. Defaults are the paper's (Table 1) unless a
comment says why we differ."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


def default_home() -> Path:
    """``$SLEEPWAKE_HOME`` or ``~/.sleepwake``."""
    return Path(os.environ.get("SLEEPWAKE_HOME") or Path.home() / ".sleepwake").expanduser()


def default_cache_dir() -> Path:
    """Converted model weights and covariance statistics; shared by all homes."""
    env = os.environ.get("SLEEPWAKE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sleepwake"


@dataclass(frozen=True)
class MemitConfig:
    """MEMIT hyperparameters (paper Table 1, original MEMIT code where the paper is silent)."""

    layers: tuple[int, ...] | None = None
    """Edited layers; None picks the model's default (see ``models.default_layers``)."""
    lambda_reg: float = 10.0
    """λ in eq. 3: weight of the covariance Ĉ against the new keys K Kᵀ.

    Not the paper's 0.1: with Ĉ the per-token mean, a key's Mahalanobis norm kᵀĈ⁻¹k
    is ~d_in (1536 here), so λ=0.1 means almost no regularisation, and near-collinear
    keys with different targets blow the update up (measured: perplexity ×35 at 60
    facts with relation-token keys). With subject keys, λ=10 gave raw recall 0.97
    and +0.4% perplexity on 30 facts, λ=50 0.90 (BENCHMARKS.md)."""
    v_steps: int = 40
    """The paper's 30 left a shared subject δ short of its targets. Doubled for a batch
    where one δ carries three or more facts (``memit.targets.step_budget``)."""
    v_lr: float = 2.0
    """Adam step for δ. The paper's 0.5 needs ~80 steps for one δ shared by several
    facts and both prompt forms; 2.0 converges in ~35 (BENCHMARKS.md)."""
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.0
    """Penalty on ‖δ‖²/‖h‖² in the v* loss: a smaller δ is a smaller weight change."""
    bf16_targets: bool | None = None
    """Run most v* steps on a CPU with the matmuls above the edited layer in bfloat16, then
    float32 steps (≤ v_steps/4) until every δ meets the early stop in float32
    (``memit.targets``). None (auto): only where bf16 matmuls are measured faster than
    float32 ones on this CPU. On the session-7 machine they were (injecting 5 facts,
    medians of same-time pairs: 13.7 → 11.7 s and 14.5 → 10.7 s); on the session-11
    machine (AVX512-BF16, no AMX) bf16 matmuls ran at 0.6× float32 speed, and 20 steps
    of a 15-fact batch took 60 s against 38 s all in float32 (BENCHMARKS.md). True: on
    every CPU with bf16 support; False: never."""
    cuda_graphs: bool = True
    """On a GPU, capture one v* step as a CUDA graph and replay it (eager steps if capture fails)."""
    clamp_norm_factor: float = 0.75
    """‖δ‖ ≤ factor·‖h‖ at the last edited layer (as in the original MEMIT). A smaller δ is
    a smaller weight change: at 100 facts (3 fact sets, H100) 0.75 gave raw recall 0.93,
    locality 0.97 and +1.5% perplexity against 0.85, 0.90 and +4.1% for 1.5
    (BENCHMARKS.md). Its edits hold with less margin, which is why a sleep keeps the
    exact take-over alone unless its training does better
    (``SleepConfig.keep_training_only_if_better``)."""
    early_stop_loss: float = 0.05
    """Stop optimising v* when the mean target NLL is below this."""
    cov_texts: int = 240
    cov_max_tokens: int = 128
    """Each reference text is truncated to this many tokens for Ĉ."""
    key_positions: str = "subject"
    """Where keys are read (see ``memit.requests``): "subject" (the subject's last
    token; one δ per subject), "last" (last prompt token) or "target" (last prompt
    token and each target token but the last)."""
    chat_edit: bool = True
    """Also edit with the chat-formatted question as the prompt, so that facts are
    visible to chat questions at once (the paper's §7 limitation)."""
    chat_edit_max_facts: int | None = 40
    """Chat edits only while MEMIT holds at most this many facts (None: no limit). A chat
    edit is dearer than a raw one, and the cost grows with the facts held: at 100 facts
    (H100, six fact sets) chat edits throughout gave perplexity +1.49% and locality
    0.943, raw-only edits +0.93% and 0.966. So the batch that takes MEMIT past the limit
    first edits every fact it holds again for the raw prompt only, and later batches
    edit raw-only, until a sleep empties MEMIT; chat questions see those facts after the
    sleep. With 40 (H200): +1.00% and 0.970 at 100 facts on the same six fact sets, +0.96%
    and 0.959 on six others. The default sleep pressure calls a nap at about 33 facts, so
    in use facts stay visible to chat questions (BENCHMARKS.md)."""
    constrain_previous: bool = True
    """Eq. 5: keep earlier edits' keys in the solve with zero residual."""

    def __post_init__(self) -> None:
        if self.key_positions not in ("subject", "last", "target"):
            raise ValueError(f"key_positions must be 'subject', 'last' or 'target', not {self.key_positions!r}")
        if self.lambda_reg <= 0:
            raise ValueError("lambda_reg must be > 0")
        if self.v_steps < 1:
            raise ValueError("v_steps must be ≥ 1")
        if self.chat_edit_max_facts is not None and self.chat_edit_max_facts < 0:
            raise ValueError("chat_edit_max_facts must be ≥ 0 or None")


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 24
    """Raw completions and chat answers are greedy (deterministic) up to this length."""


@dataclass(frozen=True)
class PressureConfig:
    """Sleep pressure, eq. 6 (paper §3.5 defaults)."""

    w_edits: float = 0.6
    w_time: float = 0.3
    w_ppl: float = 0.1
    max_edits: int = 50
    max_awake_s: float = 7200.0
    nap_at: float = 0.4
    deep_at: float = 0.8
    naps_per_deep: int = 4
    """A nap that is due becomes a deep sleep once this many naps were accepted since the
    last deep one, or when the last sleep was rejected: naps alone leave every fact's
    keys as they were read when it was consolidated, and only a deep sleep reads them
    again (0 turns this off; deep sleep then comes from the pressure alone)."""
    deep_growth: float = 0.25
    """The `naps_per_deep` trigger also waits until the facts those naps consolidated are at
    least this share of the facts held before them. A deep sleep reads every held fact again, so
    with a fixed number of naps between deep sleeps the sleeping time grew with the square
    of the facts told (on one H100: 277 s of sleep to 200 facts, 902 s to 400); spaced by
    growth, deep sleeps come at about 1.25× the facts of the last one past ~100 facts, and
    their total cost stays linear (0 keeps the fixed count alone)."""
    nap_when_unheld: bool = True
    """A nap is due as soon as a fact that MEMIT holds is known not to be answered (the
    check right after an injection): the nap moves it into the keyed memory, which holds
    what a weight edit under MEMIT's norm bound cannot (`sleep.pressure`)."""

    def __post_init__(self) -> None:
        if self.max_edits < 1 or self.max_awake_s <= 0:
            raise ValueError("max_edits and max_awake_s must be positive")
        if self.naps_per_deep < 0:
            raise ValueError("naps_per_deep must be ≥ 0")
        if self.deep_growth < 0:
            raise ValueError("deep_growth must be ≥ 0")
        if not 0 < self.nap_at <= self.deep_at:
            raise ValueError("need 0 < nap_at ≤ deep_at")


@dataclass(frozen=True)
class SleepConfig:
    """One kind of sleep (nap or deep sleep): how it trains and how it is judged.

    A sleep first takes the MEMIT edits over into an adapter exactly, then trains a
    fresh LoRA part on question/answer pairs (see ``sleep.cycle``). Not the paper's
    recipe of a LoRA trained from scratch (lr 1e-4, 1 epoch): on this model that
    taught no facts, and rates that did leaked the new objects into other answers
    ("The capital of Spain is Cluj-Napoca", BENCHMARKS.md). The fresh part sits where
    MEMIT writes (the down-projections of the edited layers) and pays a penalty on
    how much it changes their output on ordinary text (MEMIT's covariance Ĉ).
    """

    rank: int = 16
    alpha: float = 32.0
    lr: float = 3e-3
    epochs: int = 2
    batch_size: int = 8
    cov_penalty: float = 10.0
    """Weight of E‖ΔW·k‖² over ordinary keys k, relative to E‖W·k‖² (0 turns it off)."""
    replay_ratio: float = 0.2
    """Share of earlier training pairs mixed back in (paper: 20% light, 60% deep)."""
    replay_decay: float = 0.85
    """A replayed pair's priority is multiplied by this each time it is replayed."""
    dreams: int = 0
    """Questions the model answers itself before training ("dreaming"); training then
    keeps its predictions along those answers (KL), so the rest of what it knows stays."""
    max_ppl_increase: float = 0.05
    """Reject the cycle if perplexity rises more than this (relative to before it)."""
    tau: float = 0.5
    """Reject if the chat recall of already consolidated facts falls below tau · before."""
    keep_training_only_if_better: bool = True
    """Keep the trained part only if, in validation, it answers more facts than the exact
    take-over of the MEMIT edits alone, or as many while it also learned conversation
    exchanges (which validation cannot score); otherwise keep the take-over alone, which
    changes the model least (H100, 60 facts through naps and a deep sleep: locality 0.952
    against 0.938, BENCHMARKS.md). False keeps the trained part whatever it did (the
    paper's recipe; for ablations)."""

    def __post_init__(self) -> None:
        if self.rank < 1 or self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("rank, epochs, batch_size and lr must be positive")
        if not 0 <= self.replay_ratio < 1:
            raise ValueError("replay_ratio must be in [0, 1)")


@dataclass(frozen=True)
class BudgetConfig:
    """How far from the *base* model learning may take the model, judged at every sleep.

    The sleeps' own gate (`SleepConfig.max_ppl_increase`) compares with the state just
    before the sleep, which let the damage ratchet up five percent at a time (+388%
    perplexity after 13 naps, issue #25). A sleep that ends over this budget is
    rejected unless it leaves the model better than it found it."""

    max_ppl_increase: float = 0.03
    """Perplexity may be at most this much over the base model's (+3%)."""
    min_locality: float = 0.95
    """Share of the gate's real-world facts (`gate_facts`) still completed as the base
    model completes them."""

    def __post_init__(self) -> None:
        if self.max_ppl_increase < 0 or not 0 <= self.min_locality <= 1:
            raise ValueError("max_ppl_increase must be ≥ 0 and min_locality in [0, 1]")


@dataclass(frozen=True)
class CurationConfig:
    """Which conversation exchanges a deep sleep learns from (paper §3.4; `sleep.curate`).
    Scores are in [0, 1]; an exchange must reach every threshold."""

    min_novelty: float = 0.3
    min_importance: float = 0.5
    """0.5 or more: the user's message stated at least one fact."""
    min_utility: float = 0.25
    max_exchanges: int = 16
    """At most this many per deep sleep, the best first (they lengthen training)."""

    def __post_init__(self) -> None:
        if not all(0 <= x <= 1 for x in (self.min_novelty, self.min_importance, self.min_utility)):
            raise ValueError("curation thresholds must be in [0, 1]")
        if self.max_exchanges < 0:
            raise ValueError("max_exchanges must be ≥ 0")


@dataclass(frozen=True)
class MemoryConfig:
    """Everything `Memory` needs besides the model and the home directory."""

    memit: MemitConfig = field(default_factory=MemitConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    batch_size: int = 5
    """Facts per MEMIT solve when injecting many (the paper injects batches of 5)."""
    progress: bool = True
    """Show progress bars on long work."""
    nap: SleepConfig = field(default_factory=SleepConfig)
    deep: SleepConfig = field(default_factory=lambda: SleepConfig(lr=2e-3, replay_ratio=0.6, dreams=16))
    pressure: PressureConfig = field(default_factory=PressureConfig)
    curation: CurationConfig = field(default_factory=CurationConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    auto_sleep: bool = False
    """Nap or sleep by themselves when the pressure calls for it (after `inject`)."""
    consolidation: str = "keyed"
    """Where sleep moves facts: "keyed" (one δ and its keys per subject, read only where the
    subject is: `sleepwake.keyed`, `sleep.keyed_sleep`) or "lora" (the MEMIT edits taken over
    into a LoRA adapter, plus a trained part: `sleep.cycle`; the design before issue #25).
    Keyed entries need subject keys: with other `key_positions` sleep uses "lora"."""
    keyed_threshold: float = 0.8
    """Cosine similarity from which a position's key reads a keyed entry (`sleepwake.keyed`):
    at the first MEMIT layer a subject's own keys in other sentences sit at ≥ 0.86, other
    subjects' at ≤ 0.61 and other text at ≤ 0.44 (100 facts, `benchmarks/keyed_probe.py`).
    A stranger with a held subject's surname reads it alike (0.68–0.99): the first-name
    key (`keyed.HEAD_THRESHOLD`) tells them apart."""
    keyed_clamp_norm_factor: float = 3.0
    """‖δ‖ ≤ factor·‖h‖ for a δ a sleep solves for the keyed memory. MEMIT's own bound
    (`MemitConfig.clamp_norm_factor`, 0.75) keeps a weight edit from disturbing other
    text; a keyed δ acts only where its subject is read, and one δ carries all of a
    subject's facts. One user's six facts (CPU): 0/6 answered at 0.75, 6/6 at 1.5 and
    at 3.0, perplexity equal to the base model's each time."""
    reconsolidate: bool = True
    """A new fact about a subject the keyed memory holds goes into its entry at once
    (`sleepwake.reconsolidate`), not back through MEMIT with all the subject's facts."""
    keep_tables: int = 8
    """Superseded keyed tables a home keeps, so that `rollback` reaches back this many keyed
    sleeps (`Store.prune_tables`). Each keyed sleep writes the whole table (about 0.16 MB a
    subject on the default model), so keeping them all made the home grow with the square
    of its naps."""
    guard: bool = True
    """Check after each MEMIT batch whether it knocked out earlier facts, and if so try
    again with their subjects in the same solve (``Memory._edit_guarded``)."""

    def __post_init__(self) -> None:
        if self.consolidation not in ("keyed", "lora"):
            raise ValueError(f"consolidation must be 'keyed' or 'lora', not {self.consolidation!r}")
        if not 0 < self.keyed_threshold < 1:
            raise ValueError("keyed_threshold must be in (0, 1)")
        if self.keyed_clamp_norm_factor <= 0:
            raise ValueError("keyed_clamp_norm_factor must be > 0")
        if isinstance(self.keep_tables, bool) or not isinstance(self.keep_tables, int) or self.keep_tables < 0:
            raise ValueError(f"keep_tables must be an integer >= 0, not {self.keep_tables!r}")

    def with_memit(self, **changes: Any) -> MemoryConfig:
        return replace(self, memit=replace(self.memit, **changes))

    def to_dict(self) -> dict[str, Any]:
        def conv(obj: Any) -> Any:
            if hasattr(obj, "__dataclass_fields__"):
                return {f.name: conv(getattr(obj, f.name)) for f in fields(obj)}
            if isinstance(obj, tuple):
                return list(obj)
            return obj

        return conv(self)
