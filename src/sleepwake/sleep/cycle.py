"""One sleep cycle — a nap or a deep sleep — from MEMIT edits to a LoRA adapter.

1. Take over: the MEMIT edits to consolidate become the first part of a new adapter,
   exactly (an edit is already a low-rank delta on a down-projection: ΔW = A·B is a
   LoRA with lora_B = A, lora_A = B). A deep sleep, or any sleep after a consolidated
   fact was forgotten or replaced, rebuilds the whole consolidated memory this way
   from the stored edits of the facts that remain, so nothing of a forgotten fact
   stays in the weights.
2. Train: a second, fresh LoRA part learns the facts' question/answer pairs (plus
   replayed pairs of earlier cycles, and in a deep sleep the conversation exchanges
   that curation kept, see ``sleep.curate``) with the MEMIT edits switched off, under a
   penalty on how much it changes the modules' output on ordinary text. A deep sleep
   also "dreams": the model first answers questions about its consolidated facts and
   the world, and training keeps its predictions along those answers (KL).
3. Validate with the MEMIT edits off: a subject whose facts are all answered in chat
   leaves MEMIT; the others keep their edits (for the next sleep). The trained part is
   dropped unless it answers more facts than the take-over alone (or as many, when it
   also learned conversation exchanges). The cycle is
   rejected — and nothing changes — if perplexity rises more than allowed, or the
   already consolidated facts fall below τ times their recall before.
4. Commit: adapter directory, then one ledger transaction; then the live weights.

What runs on the model itself — recall checks, dreams and their teacher, the training —
goes through the backend's `LoraSleep` (`TorchSleep`, or MLX's `mlx.lora.MlxSleep`);
the steps above are the same code on every backend.

The paper trains a LoRA from scratch at this point (§3.3); on this model that taught
no facts at its learning rate and leaked the new objects into other answers at
higher ones (BENCHMARKS.md), which the take-over avoids.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from sleepwake.config import SleepConfig
from sleepwake.evaluate import EvalReport, evaluate_facts
from sleepwake.facts import Fact
from sleepwake.inference import chat_text, encode, encode_target, generate
from sleepwake.memit.editor import FactEdit
from sleepwake.policy import edit_group
from sleepwake.sleep.commit import commit, committed_locality, rewrite_kept
from sleepwake.sleep.curate import curate
from sleepwake.sleep.curate import pairs as conversation_pairs
from sleepwake.sleep.data import dream_questions, examples, fact_pairs
from sleepwake.sleep.keyed_sleep import consolidate_keyed
from sleepwake.sleep.lora import (
    Adapter,
    Example,
    Soft,
    TrainStats,
    attached,
    combine,
    from_factors,
    new_adapter,
    output_penalty,
    soft_targets,
    train,
)
from sleepwake.sleep.report import CycleReport, over_budget

if TYPE_CHECKING:
    from sleepwake.memory import Memory
    from sleepwake.store import FactRecord


class LoraSleep(Protocol):
    """What a LoRA sleep runs on a backend's model; the rest of the cycle is shared. A
    memory class names its own as `lora_sleep` (`sleepwake.mlx.lora.MlxSleep`); torch's
    `Memory` names none and gets `TorchSleep`."""

    def recall(self, facts: Sequence[Fact]) -> EvalReport: ...

    def answers(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[str]: ...

    def soft_targets(self, examples: Sequence[Example], pad_id: int) -> list[Soft]: ...

    def new_adapter(self, names: Sequence[str], r: int, alpha: float, seed: int) -> Adapter: ...

    def train(self, fixed: Adapter, fresh: Adapter, examples: Sequence[Example], *, teacher: Sequence[Soft | None],
              cfg: SleepConfig, covariances: dict[str, torch.Tensor], pad_id: int, seed: int,
              desc: str) -> TrainStats:
        """Train `fresh` in place on `examples` with `fixed` added, under the output
        penalty over `covariances` (Ĉ per module name) when `cfg.cov_penalty` is on."""
        ...


class TorchSleep:
    """`LoraSleep` on a PyTorch model (`sleep.lora`, `evaluate`, `inference`)."""

    def __init__(self, mem: Memory) -> None:
        self.mem = mem

    def recall(self, facts: Sequence[Fact]) -> EvalReport:
        return evaluate_facts(self.mem.model, self.mem.tokenizer, facts, None, progress=False)

    def answers(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[str]:
        return generate(self.mem.model, self.mem.tokenizer, prompts, max_new_tokens=max_new_tokens)

    def soft_targets(self, examples: Sequence[Example], pad_id: int) -> list[Soft]:
        return soft_targets(self.mem.model, examples, pad_id=pad_id)

    def new_adapter(self, names: Sequence[str], r: int, alpha: float, seed: int) -> Adapter:
        return new_adapter(self.mem.model, names, r, alpha, seed=seed)

    def train(self, fixed: Adapter, fresh: Adapter, examples: Sequence[Example], *, teacher: Sequence[Soft | None],
              cfg: SleepConfig, covariances: dict[str, torch.Tensor], pad_id: int, seed: int,
              desc: str) -> TrainStats:
        mem = self.mem
        penalty = output_penalty(covariances, {n: mem.lm.base_weight(n) for n in fresh.names},
                                 cfg.cov_penalty) if cfg.cov_penalty else None
        with attached(mem.model, fixed):
            return train(mem.model, fresh, examples, pad_id=pad_id, lr=cfg.lr, epochs=cfg.epochs,
                         batch_size=cfg.batch_size, teacher=teacher, penalty=penalty, seed=seed,
                         progress=mem.progress, desc=desc)


def takeover(mem: Memory, edits: dict[int, FactEdit]) -> Adapter | None:
    """One adapter equal to the sum of `edits` (columns of an edit missing on a module are zero)."""
    if not edits:
        return None
    names = sorted({n for e in edits.values() for n in e.factors(mem.lm.arch)})
    factors = {}
    for n in names:
        lefts, rights = [], []
        for e in edits.values():
            f = e.factors(mem.lm.arch)
            width = next(iter(e.a.values())).shape[1]
            d_out, d_in = mem.lm.arch.shape(n)
            zeros = {"dtype": torch.float32, "device": mem.lm.arch.device(n)}
            left, right = f.get(n, (torch.zeros(d_out, width, **zeros), torch.zeros(width, d_in, **zeros)))
            lefts.append(left)
            rights.append(right)
        factors[n] = (torch.cat(lefts, dim=1), torch.cat(rights, dim=0))
    return from_factors(factors)


def run_cycle(mem: Memory, kind: str) -> CycleReport:
    """Run one nap ("nap") or deep sleep ("deep"); see the module docstring, and
    `sleep.keyed_sleep` for `MemoryConfig.consolidation="keyed"`."""
    if kind not in ("nap", "deep"):
        raise ValueError(f"sleep kind must be 'nap' or 'deep', not {kind!r}")
    store = mem.store
    memit = store.facts(where="memit")
    keyed = mem.config.consolidation == "keyed" and mem.config.memit.key_positions == "subject"
    rebuild = kind == "deep" or store.meta("rebuild_pending") == "1"
    held = store.facts(where="consolidated") if rebuild else []
    if not memit and not (rebuild and (held or mem._adapters or mem._keyed)):
        return CycleReport(None, kind, "nothing to do", reason="no facts are held by MEMIT edits")
    cycle = store.begin_cycle(kind)
    try:
        if keyed:
            t0 = time.perf_counter()
            report = CycleReport(cycle, kind, "rejected", rebuilt=rebuild, ppl_before=mem.perplexity(),
                                 ppl_base=mem.base_perplexity())
            report = consolidate_keyed(mem, kind, cycle, memit, report, t0)
        else:
            report = _consolidate(mem, kind, cycle, memit, held, rebuild)
    except BaseException as exc:  # also KeyboardInterrupt: back to the last good state
        mem._rebuild()
        shutil.rmtree(store.adapter_path(cycle), ignore_errors=True)
        store.keyed_path(cycle).unlink(missing_ok=True)
        store.end_cycle(cycle, "failed", {"error": f"{type(exc).__name__}: {exc}"})
        raise
    return report


def _consolidate(mem: Memory, kind: str, cycle: int, memit: list[FactRecord], held: list[FactRecord],
                 rebuild: bool) -> CycleReport:
    t0 = time.perf_counter()
    cfg = mem.config.nap if kind == "nap" else mem.config.deep
    store, tok = mem.store, mem.tokenizer
    ops: LoraSleep = getattr(mem, "lora_sleep", TorchSleep)(mem)
    report = CycleReport(cycle, kind, "rejected", rebuilt=rebuild, ppl_before=mem.perplexity(),
                         ppl_base=mem.base_perplexity())
    mark = [t0]

    def phase(name: str) -> None:
        now = time.perf_counter()
        report.phases[name] = round(report.phases.get(name, 0.0) + now - mark[0], 3)
        mark[0] = now

    if held:
        report.held_recall_before = ops.recall([r.fact for r in held]).chat_recall
    stored = {r.id: store.load_edit(r.id, mem.lm.arch.layer_device) for r in held}
    base_adapters = [] if rebuild else list(mem._adapters)

    def taken_over(ids: set[int]) -> Adapter | None:
        chosen = {i: mem._edits[i] for i in sorted(ids) if i in mem._edits}
        chosen.update({i: e for i, e in stored.items() if i in ids})
        return takeover(mem, dict(sorted(chosen.items())))

    phase("measure")
    ids = {r.id for r in memit} | set(stored)
    transfer = taken_over(ids)
    if transfer is None:  # a rebuild with nothing left: the consolidated memory becomes empty
        mem._rebuild(None, [])
        report.ppl_after, report.locality_after = mem.perplexity(), mem.locality()
        return commit(mem, report, cycle, None, [], [], [], cfg, t0)

    # Dreams: what the model answers now, before anything changes; training keeps it.
    dreams, soft = [], []
    if cfg.dreams:
        qs = dream_questions(cfg.dreams, cycle, [r.fact for r in held])
        prompts = [encode(tok, chat_text(tok, q), chat=True) for q in qs]
        answers = ops.answers(prompts, mem.config.generation.max_new_tokens)
        dreams = [Example(tuple(p) + tuple(encode_target(tok, chat_text(tok, q), a, chat=True)), ())
                  for p, q, a in zip(prompts, qs, answers)]
        soft = ops.soft_targets(dreams, tok.pad_token_id if tok.pad_token_id is not None else 0)

    # Train the fresh part with every MEMIT edit off.
    names = transfer.names
    layer_of = {mem.lm.arch.down_name(l): l for l in mem.layers}
    covs = mem.covariances()
    covs = {n: covs[layer_of[n]] for n in names if n in layer_of}
    fresh = ops.new_adapter(names, cfg.rank, cfg.alpha, seed=cycle)
    pairs = [p for r in memit + held for p in fact_pairs(r.fact, tok, r.id)]
    scored = curate(store.exchanges(), store.curated_before(), mem.config.curation) if kind == "deep" else []
    talk = conversation_pairs(scored)
    report.exchanges, report.exchanges_kept = len(scored), len(talk)
    n_replay = round(len(pairs) * cfg.replay_ratio / (1 - cfg.replay_ratio))
    replay = [(i, p) for i, p in store.replay_pairs(n_replay + len(pairs)) if p.fact_id not in ids][:n_replay]
    mem._rebuild([], base_adapters)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    taught = examples(pairs + talk + [p for _, p in replay], tok)
    phase("prepare")
    stats = ops.train(transfer, fresh, taught + dreams, teacher=[None] * len(taught) + soft, cfg=cfg,
                      covariances=covs, pad_id=pad, seed=cycle, desc=kind)
    report.train_steps, report.train_loss = stats.steps, (stats.loss_first, stats.loss_last)
    phase("train")

    # Validate with the MEMIT edits off. The trained part must earn its place: unless it
    # answers more facts than the exact take-over alone (or as many while it also holds
    # conversation exchanges, which validation cannot score), the take-over alone is kept,
    # as it changes the model least; a short training can even blur an edit.
    facts = memit + held

    def validate(adapter: Adapter) -> tuple[EvalReport, list[int], int]:
        mem._rebuild([], [*base_adapters, adapter])
        res = ops.recall([r.fact for r in facts])
        ok: dict[object, bool] = {}
        for r, fr in zip(facts, res.facts):
            group = edit_group(r.fact, mem.config.memit)
            ok[group] = ok.get(group, True) and fr.chat_ok
        passed = [r.id for r in memit if ok[edit_group(r.fact, mem.config.memit)]]
        held_ok = sum(fr.chat_ok for r, fr in zip(facts, res.facts) if r.where != "memit")
        return res, passed, len(passed) + held_ok

    res, passed, score = validate(combine([transfer, fresh]))
    if cfg.keep_training_only_if_better:
        alone = validate(transfer)
        if alone[2] > score or (alone[2] == score and not talk):
            (res, passed, score), fresh, report.trained_part_dropped = alone, None, True
    phase("validate")
    report.kept = [r.id for r in memit if r.id not in passed]
    report.consolidated = passed
    n = len(memit) or 1
    report.chat_recall = sum(fr.chat_ok for r, fr in zip(facts, res.facts) if r.where == "memit") / n if memit else None
    report.raw_recall = sum(fr.raw_ok for r, fr in zip(facts, res.facts) if r.where == "memit") / n if memit else None
    if held:
        report.held_recall_after = sum(fr.chat_ok for r, fr in zip(facts, res.facts) if r.where != "memit") / len(held)

    # The adapter keeps the edits of the facts that passed (and of all held ones). The
    # others failed with this adapter, their own edits included: they are edited in
    # again on top of it, so that they stay answered until a later sleep.
    if report.kept:
        transfer = taken_over(ids - set(report.kept))
    parts = [p for p in (transfer, fresh) if p is not None]
    adapter = combine(parts) if parts else None
    adapters = [*base_adapters, *([adapter] if adapter else [])]
    mem._rebuild([], adapters)
    phase("rebuild")
    again = rewrite_kept(mem, [r for r in memit if r.id in set(report.kept)], [mem._edits[i] for i in passed])

    def candidate() -> None:
        mem._rebuild([again[i] for i in sorted(again)], adapters)

    if again:
        candidate()
        report.kept_recall = ops.recall([r.fact for r in memit if r.id in again]).chat_recall
    phase("edit kept facts again")
    report.ppl_after, report.locality_after = mem.perplexity(), mem.locality()
    before = committed_locality(mem, candidate)
    phase("measure")

    if not passed and not rebuild:
        report.reason = "no fact was answered in chat without its MEMIT edit"
    elif reason := over_budget(report, mem.config.budget, cfg.max_ppl_increase, before):
        report.reason = reason
    elif held and report.held_recall_after < cfg.tau * report.held_recall_before:
        report.reason = (f"consolidated facts' recall fell from {report.held_recall_before:.2f} to "
                         f"{report.held_recall_after:.2f} (τ = {cfg.tau})")
    else:
        trained = [p for p in pairs if p.fact_id in set(passed) | set(stored)] + talk
        return commit(mem, report, cycle, adapter, passed, trained, [i for i, _ in replay], cfg, t0,
                       curated=[s.exchange.id for s in scored], rewritten=again)
    mem._rebuild()
    report.seconds = time.perf_counter() - t0
    store.end_cycle(cycle, "rejected", report.to_dict())
    return report
