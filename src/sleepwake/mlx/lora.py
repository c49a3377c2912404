"""LoRA sleep on MLX: what `sleep.cycle` runs on the model in a nap or deep sleep with
`consolidation="lora"` (`sleep.cycle.LoraSleep`), the rest of the cycle being shared.

Training has the torch backend's objective (`sleep.lora.train`), so the same home sleeps
alike on either backend: cross-entropy on the answer tokens, the KL to the model's own
earlier predictions along dreams, the output penalty over Ĉ; Adam (torch's AdamW without
weight decay: bias-corrected) with the same linear decay, batches in the same shuffled
order, from the same initial adapter (`fresh_adapter`, seeded by the cycle). The adapter's
factors are added to the down-projections' outputs through the model's taps (`Taps.lora`),
so gradients reach them and nothing else; the result is a torch `Adapter`, saved as PEFT.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import torch
from tqdm.auto import tqdm

from sleepwake.config import SleepConfig
from sleepwake.evaluate import EvalReport
from sleepwake.facts import Fact
from sleepwake.mlx.memit import to_mx, to_torch
from sleepwake.mlx.model import MlxModel
from sleepwake.sleep.lora import Adapter, Example, Soft, TrainStats, fresh_adapter

if TYPE_CHECKING:
    from sleepwake.mlx.memory import MlxMemory

Params = dict[str, dict[str, mx.array]]  # module name -> {"a": r × d_in, "b": d_out × r}


@dataclass
class _Batch:
    """Examples right-padded, and the positions the loss reads (`sleep.lora._loss`): each
    answer token's, and every position of an example that has a teacher."""

    ids: mx.array
    rows: mx.array
    cols: mx.array  # the position whose next token is predicted
    ce: mx.array | None  # which read positions have an answer token ...
    targets: mx.array | None  # ... and which
    soft: mx.array | None  # which read positions have a teacher, in order
    index: mx.array | None  # their teacher's top-k tokens
    logp: mx.array | None  # and log-probabilities


def _ids(seqs: Sequence[Sequence[int]], pad: int) -> mx.array:
    n = max(len(s) for s in seqs)
    ids = np.full((len(seqs), n), pad, dtype=np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    return mx.array(ids)


def _batch(examples: Sequence[Example], teacher: Sequence[Soft | None], pad: int) -> _Batch:
    rows, cols, labels, soft, index, logp = [], [], [], [], [], []
    for i, (e, t) in enumerate(zip(examples, teacher)):
        taught = t.index.shape[0] if t is not None else 0
        for j in range(len(e.ids) - 1):
            label = e.ids[j + 1] if j + 1 >= len(e.prompt) else -1
            if label >= 0 or j < taught:
                if j < taught:
                    soft.append(len(rows))
                rows.append(i), cols.append(j), labels.append(label)
        if t is not None:
            index.append(t.index.numpy()), logp.append(t.logp.float().numpy())
    ce = [k for k, label in enumerate(labels) if label >= 0]
    return _Batch(_ids([e.ids for e in examples], pad), mx.array(rows), mx.array(cols),
                  mx.array(ce) if ce else None, mx.array([labels[k] for k in ce]) if ce else None,
                  mx.array(soft) if soft else None, mx.array(np.concatenate(index).astype(np.int32)) if soft else None,
                  mx.array(np.concatenate(logp)) if soft else None)


def _objective(mm: MlxModel, b: _Batch) -> mx.array:
    """Mean cross-entropy on the answer tokens + Σ KL to the teacher / positions taught;
    the LM head runs only at the positions read."""
    h = mm.blocks(mm.embed(b.ids), 0, mm.n_layers)
    logits = mm.logits(h[b.rows, b.cols]).astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    loss = mx.array(0.0)
    if b.ce is not None:
        loss = -mx.mean(mx.take_along_axis(logp[b.ce], b.targets[:, None], axis=1))
    if b.soft is not None:
        student = mx.take_along_axis(logp[b.soft], b.index, axis=1)
        loss = loss + mx.sum(mx.exp(b.logp) * (b.logp - student)) / b.soft.shape[0]
    return loss


def _penalty(mm: MlxModel, covariances: dict[str, torch.Tensor], weight: float,
             scale: float) -> Callable[[Params], mx.array]:
    """`sleep.lora.output_penalty` on MLX factors: weight · Σ tr(BᵀB · AĈAᵀ)·scale² / tr(WĈWᵀ)."""
    base = {n: mm.base_weight(mm.arch.layer_of(n)) for n in covariances}
    norm = {n: float(torch.trace(base[n] @ c.float() @ base[n].t())) for n, c in covariances.items()}
    cov = {n: to_mx(c) for n, c in covariances.items()}

    def penalty(p: Params) -> mx.array:
        total = mx.array(0.0)
        for n, c in cov.items():
            a, b = p[n]["a"], p[n]["b"]
            total = total + mx.trace((b.T @ b) @ (a @ c @ a.T)) * scale**2 / norm[n]
        return weight * total

    return penalty


class MlxSleep:
    """`sleep.cycle.LoraSleep` on an `MlxMemory`'s model (`MlxMemory.lora_sleep`)."""

    def __init__(self, mem: MlxMemory) -> None:
        self.mem = mem

    def recall(self, facts: Sequence[Fact]) -> EvalReport:
        return self.mem.evaluate(facts)

    def answers(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[str]:
        return [self.mem.mm.generate(p, max_new_tokens) for p in prompts]

    def soft_targets(self, examples: Sequence[Example], pad_id: int, k: int = 32, batch_size: int = 16) -> list[Soft]:
        """What the model, as it is now, predicts along each example: its top-k next tokens
        at each position, log-probabilities renormalised over them (`sleep.lora.soft_targets`)."""
        mm, out = self.mem.mm, []
        for s in range(0, len(examples), batch_size):
            chunk = examples[s : s + batch_size]
            logits = mm.logits(mm.blocks(mm.embed(_ids([e.ids for e in chunk], pad_id)), 0, mm.n_layers)[:, :-1])
            logp = logits.astype(mx.float32) - mx.logsumexp(logits.astype(mx.float32), axis=-1, keepdims=True)
            index = mx.argpartition(-logp, kth=k - 1, axis=-1)[..., :k]
            top = mx.take_along_axis(logp, index, axis=-1)
            top = top - mx.logsumexp(top, axis=-1, keepdims=True)
            index, top = np.array(index).astype(np.int64), np.array(top)
            for i, e in enumerate(chunk):
                n = len(e.ids) - 1
                out.append(Soft(torch.from_numpy(index[i, :n]), torch.from_numpy(top[i, :n])))
        return out

    def new_adapter(self, names: Sequence[str], r: int, alpha: float, seed: int) -> Adapter:
        return fresh_adapter({n: self.mem.mm.arch.shape(n) for n in names}, r, alpha, seed)

    def train(self, fixed: Adapter, fresh: Adapter, examples: Sequence[Example], *, teacher: Sequence[Soft | None],
              cfg: SleepConfig, covariances: dict[str, torch.Tensor], pad_id: int, seed: int,
              desc: str) -> TrainStats:
        """Train `fresh` on `examples` with `fixed` added, the model frozen (see the module)."""
        if not examples:
            raise ValueError("no training examples")
        mm = self.mem.mm
        layer = {n: mm.arch.layer_of(n) for n in [*fixed.names, *fresh.names]}
        kept = [(layer[n], (to_mx(left), to_mx(right))) for n, (left, right) in fixed.factors().items()]
        params: Params = {n: {"a": to_mx(fresh.a[n]), "b": to_mx(fresh.b[n])} for n in fresh.names}
        penalty = _penalty(mm, covariances, cfg.cov_penalty, fresh.scale) if cfg.cov_penalty else None

        def loss(p: Params, batch: _Batch) -> mx.array:
            mm.taps.lora = {}
            for l, part in kept:
                mm.taps.lora.setdefault(l, []).append(part)
            for n, ab in p.items():
                mm.taps.lora.setdefault(layer[n], []).append((ab["b"] * fresh.scale, ab["a"]))
            value = _objective(mm, batch)
            return value + penalty(p) if penalty is not None else value

        rng = random.Random(seed)
        total = math.ceil(len(examples) / cfg.batch_size) * cfg.epochs
        opt = optim.Adam(learning_rate=optim.linear_schedule(cfg.lr, 0.0, total + 1), bias_correction=True)
        losses: list[float] = []
        t0 = time.perf_counter()
        try:
            with tqdm(total=total, desc=desc, unit="step", disable=not self.mem.progress) as bar:
                for _ in range(cfg.epochs):
                    order = list(range(len(examples)))
                    rng.shuffle(order)
                    for start in range(0, len(order), cfg.batch_size):
                        chunk = order[start : start + cfg.batch_size]
                        batch = _batch([examples[i] for i in chunk], [teacher[i] for i in chunk], pad_id)
                        value, grads = mx.value_and_grad(lambda p: loss(p, batch))(params)
                        params = opt.apply_gradients(grads, params)
                        mx.eval(params, opt.state)
                        losses.append(value.item())
                        bar.update(1)
                        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        finally:
            mm.taps.lora = {}
        for n, ab in params.items():
            fresh.a[n], fresh.b[n] = to_torch(ab["a"]), to_torch(ab["b"])
        return TrainStats(len(losses), time.perf_counter() - t0, losses[0], losses[-1])
