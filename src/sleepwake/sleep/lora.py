"""LoRA adapters: train one on a frozen model, keep it as factors, save it as PEFT.

Training attaches ``x ↦ x·Aᵀ·Bᵀ·scale`` to each target module with a forward hook,
so the model's modules stay the plain (or 4-bit) `nn.Linear`s that MEMIT and
`LiveWeights` address by name. On disk an adapter is a PEFT LoRA directory (``adapter_config.json``
+ ``adapter_model.safetensors``) that `peft.PeftModel.from_pretrained` loads as is.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from sleepwake.errors import StoreError
from sleepwake.inference import attention_kernels, head_logits
from sleepwake.models import linear_shape
from sleepwake.placement import Where, input_device, module_device, place
from sleepwake.weights import Factor

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."


@dataclass
class Adapter:
    """Per module name: A (r × d_in) and B (d_out × r); the delta is scale·B @ A."""

    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    r: int
    alpha: float
    conv1d: frozenset[str] = field(default_factory=frozenset)  # modules whose weight is stored (in, out)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @property
    def names(self) -> list[str]:
        return list(self.a)

    def factors(self) -> dict[str, Factor]:
        return {n: (self.b[n] * self.scale, self.a[n]) for n in self.a}

    def truncated(self, max_rank: int) -> Adapter:
        """Each module's delta cut to its best approximation of rank at most `max_rank`
        (the largest singular values kept), as an adapter of that rank and scale 1.

        The SVD is of the small core of scale·B·A = Q_b (R_b R_aᵀ) Q_aᵀ (QR of B and Aᵀ),
        so no d_out × d_in matrix is formed."""
        r = min(max_rank, self.r)
        a, b = {}, {}
        for n in self.a:
            qb, rb = torch.linalg.qr(self.b[n].double() * self.scale)
            qa, ra = torch.linalg.qr(self.a[n].double().t())
            u, s, vh = torch.linalg.svd(rb @ ra.t())
            k = min(r, len(s))  # a module of lower rank than `r` gets zero rows
            b[n] = self.b[n].new_zeros(self.b[n].shape[0], r)
            a[n] = self.a[n].new_zeros(r, self.a[n].shape[1])
            b[n][:, :k] = qb @ u[:, :k] * s[:k]
            a[n][:k] = vh[:k] @ qa.t()
        return Adapter(a, b, r, float(r), self.conv1d)

    def save(self, path: str | os.PathLike[str], base_model: str) -> None:
        """Write a PEFT LoRA directory atomically (a new directory, renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-adapter-", dir=path.parent))
        try:
            tensors = {}
            for n in self.a:
                tensors[f"{_PREFIX}{n}.lora_A.weight"] = self.a[n].detach().cpu().contiguous()
                tensors[f"{_PREFIX}{n}.lora_B.weight"] = self.b[n].detach().cpu().contiguous()
            save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
            config = {
                "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
                "r": self.r, "lora_alpha": self.alpha, "lora_dropout": 0.0, "bias": "none",
                "target_modules": sorted(self.a), "fan_in_fan_out": bool(self.conv1d),
                "inference_mode": True, "use_rslora": False, "init_lora_weights": True,
            }
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: Where[str] = "cpu") -> Adapter:
        """An adapter directory, each module's factors on `device` (or `device(module name)`)."""
        path = Path(path)
        try:
            config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
            tensors = load_file(str(path / WEIGHTS_FILE))
        except Exception as exc:
            raise StoreError(f"adapter {path} is missing or corrupt: {exc}") from exc
        if config.get("peft_type") != "LORA" or config.get("rank_pattern") or config.get("alpha_pattern"):
            raise StoreError(f"adapter {path}: only plain LoRA adapters (one rank, one alpha) are supported")
        a, b = {}, {}
        for key, t in tensors.items():
            name, kind = key.removeprefix(_PREFIX).rsplit(".lora_", 1)
            (a if kind == "A.weight" else b)[name] = t.to(place(device, name))
        if set(a) != set(b):
            raise StoreError(f"adapter {path}: lora_A and lora_B name different modules")
        conv1d = frozenset(a) if config.get("fan_in_fan_out") else frozenset()
        return cls(a, b, int(config["r"]), float(config["lora_alpha"]), conv1d)


def from_factors(deltas: dict[str, Factor]) -> Adapter:
    """An adapter equal to deltas given as factors L @ R (rank = their width, scale 1):
    how a nap takes over MEMIT edits exactly before it trains."""
    ranks = {left.shape[1] for left, _ in deltas.values()}
    if len(ranks) != 1:
        raise ValueError(f"deltas of different ranks {sorted(ranks)} cannot share one adapter")
    r = ranks.pop()
    return Adapter({n: rr.float().clone() for n, (_, rr) in deltas.items()},
                   {n: ll.float().clone() for n, (ll, _) in deltas.items()}, r, float(r))


def combine(parts: Sequence[Adapter]) -> Adapter:
    """Adapters side by side, as one (ranks add up, scale 1); a module one part lacks
    gets zero columns there, so the sum of the deltas is unchanged."""
    names = sorted({n for p in parts for n in p.names})
    shapes = {n: (p.b[n].shape[0], p.a[n].shape[1]) for p in parts for n in p.names}
    a, b = {}, {}
    for n in names:
        d_out, d_in = shapes[n]
        like = next(p.b[n] for p in parts if n in p.b)  # the zeros go where the module's factors are
        a[n] = torch.cat([p.a[n] if n in p.a else like.new_zeros(p.r, d_in) for p in parts])
        b[n] = torch.cat([p.b[n] * p.scale if n in p.b else like.new_zeros(d_out, p.r) for p in parts], dim=1)
    r = sum(p.r for p in parts)
    return Adapter(a, b, r, float(r), frozenset().union(*(p.conv1d for p in parts)))


def output_penalty(covariances: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                   weight: float) -> Callable[[Adapter], torch.Tensor]:
    """adapter ↦ weight · Σ E‖ΔW·k‖² / E‖W·k‖² over ordinary keys k (Ĉ = E[k kᵀ] per
    module): how much the adapter changes what the modules output on everyday text.
    Uses tr(BA Ĉ AᵀBᵀ) = tr(BᵀB · AĈAᵀ), which costs r×r, not d×d, products. Each
    module's term is computed on its weight's device (Ĉ, kept on the host, is moved there
    for the training), and summed on the first's."""
    covariances = {n: c.to(base[n].device) for n, c in covariances.items()}
    norm = {n: torch.trace(base[n].float() @ c @ base[n].float().t()) for n, c in covariances.items()}

    def penalty(adapter: Adapter) -> torch.Tensor:
        total = torch.zeros((), device=next(iter(covariances.values())).device)
        for n, c in covariances.items():
            a, b = adapter.a[n], adapter.b[n]
            term = torch.trace((b.t() @ b) @ (a @ c @ a.t())) * adapter.scale**2 / norm[n]
            total = total + term.to(total.device)
        return weight * total

    return penalty


@dataclass(frozen=True)
class Example:
    """One training sequence: cross-entropy on `target`; where the teacher has soft
    targets for the sequence, also the KL divergence to them at every position."""

    prompt: tuple[int, ...]
    target: tuple[int, ...]

    @property
    def ids(self) -> tuple[int, ...]:
        return self.prompt + self.target


@dataclass(frozen=True)
class Soft:
    """A teacher's top-k next-token log-probabilities at each position of a sequence."""

    index: torch.Tensor  # (len - 1) × k token ids
    logp: torch.Tensor  # (len - 1) × k, renormalised over the k



@dataclass
class TrainStats:
    steps: int
    seconds: float
    loss_first: float
    loss_last: float


@contextmanager
def attached(model: nn.Module, adapter: Adapter, dropout: float = 0.0) -> Iterator[None]:
    """Run `model` with `adapter` added to its modules' outputs (differentiably)."""
    drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    handles = []

    def hook(name: str):
        a, b, scale = adapter.a[name], adapter.b[name], adapter.scale

        def add(_mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            return out + (drop(args[0]).to(a.dtype) @ a.t() @ b.t() * scale).to(out.dtype)

        return add

    try:
        for n in adapter.names:
            handles.append(model.get_submodule(n).register_forward_hook(hook(n)))
        yield
    finally:
        for h in handles:
            h.remove()


def new_adapter(model: nn.Module, names: Sequence[str], r: int, alpha: float, seed: int) -> Adapter:
    """A fresh adapter on `model`'s modules `names`, each where the module computes (`fresh_adapter`)."""
    mods = {n: model.get_submodule(n) for n in names}
    return fresh_adapter({n: linear_shape(m) for n, m in mods.items()}, r, alpha, seed,
                         lambda n: module_device(mods[n]),
                         frozenset(n for n, m in mods.items() if type(m).__name__ == "Conv1D"))


def fresh_adapter(shapes: dict[str, tuple[int, int]], r: int, alpha: float, seed: int, device: Where[str] = "cpu",
                  conv1d: frozenset[str] = frozenset()) -> Adapter:
    """A fresh adapter for modules of these (d_out, d_in) shapes: A as PEFT initialises it
    (Kaiming-uniform), B zero, so it starts as a no-op. The same `seed` gives the same
    adapter on every backend."""
    gen = torch.Generator().manual_seed(seed)
    a, b = {}, {}
    for n, (d_out, d_in) in shapes.items():
        bound = 1 / math.sqrt(d_in)  # kaiming_uniform_(a=√5) on an (r × d_in) matrix
        a[n] = ((torch.rand(r, d_in, generator=gen) * 2 - 1) * bound).to(place(device, n))
        b[n] = torch.zeros(d_out, r, device=place(device, n))
    return Adapter(a, b, r, alpha, conv1d)


def _batch(examples: Sequence[Example], pad: int, device: torch.device) -> dict[str, torch.Tensor]:
    n = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), n), pad, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
        if e.target:
            labels[i, len(e.prompt) : len(e.ids)] = torch.tensor(e.target)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return out.logits[:, :-1].float()


@torch.no_grad()
def soft_targets(model: nn.Module, examples: Sequence[Example], *, pad_id: int, k: int = 32,
                 batch_size: int = 16) -> list[Soft]:
    """What the model, as it is now, predicts along each example (the teacher for `train`)."""
    device = input_device(model)
    out: list[Soft] = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        with attention_kernels(device):
            logp = torch.log_softmax(_logits(model, _batch(chunk, pad_id, device)), dim=-1)
        top = logp.topk(k, dim=-1)
        for i, e in enumerate(chunk):
            n = len(e.ids) - 1
            out.append(Soft(top.indices[i, :n].cpu(), torch.log_softmax(top.values[i, :n], dim=-1).cpu()))
    return out


def _loss(model: nn.Module, batch: dict[str, torch.Tensor], soft: Sequence[Soft | None],
          kl_weight: float) -> torch.Tensor:
    """Cross-entropy on the answer tokens, plus the KL to the teacher along whole examples
    that have one. The LM head runs only where one of them reads: a nap's pairs have a
    few answer tokens each, and with the head over every position (49k-token vocabulary)
    a 5-fact nap's training took 9.9 s instead of 6.4 s on one thread."""
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 use_cache=False).last_hidden_state[:, :-1]
    labels = batch["labels"][:, 1:].to(hidden.device)  # a device_map may end the decoder elsewhere
    read = labels != -100
    for i, t in enumerate(soft):
        if t is not None:
            read[i, : t.index.shape[0]] = True
    rows, cols = read.nonzero(as_tuple=True)  # row by row, positions in order
    logits = head_logits(model, hidden[rows, cols])
    targets = labels[rows, cols].to(logits.device)
    loss = logits.new_zeros(())
    if (targets != -100).any():
        loss = nn.functional.cross_entropy(logits, targets, ignore_index=-100)
    kl, count = logits.new_zeros(()), 0
    for i, t in enumerate(soft):
        if t is None:
            continue
        n = t.index.shape[0]
        student = torch.log_softmax(logits[(rows == i).to(logits.device)][:n], dim=-1).gather(
            1, t.index.to(logits.device))
        kl = kl + (t.logp.exp().to(logits.device) * (t.logp.to(logits.device) - student)).sum()
        count += n
    return loss + kl_weight * kl / count if count else loss


def train(
    model: nn.Module,
    adapter: Adapter,
    examples: Sequence[Example],
    *,
    pad_id: int,
    lr: float,
    epochs: int,
    batch_size: int,
    teacher: Sequence[Soft | None] | None = None,
    kl_weight: float = 1.0,
    penalty: Callable[[Adapter], torch.Tensor] | None = None,
    seed: int = 0,
    dropout: float = 0.0,
    progress: bool = False,
    desc: str = "train",
) -> TrainStats:
    """Train `adapter` in place on `examples` (AdamW, linear decay), the model frozen.

    `teacher[i]` (from `soft_targets`) keeps the model's predictions along example i
    where they should not change: the sleep trains new facts without bending the rest.
    """
    if not examples:
        raise ValueError("no training examples")
    device = input_device(model)
    params = [*adapter.a.values(), *adapter.b.values()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=False)
    rng = random.Random(seed)
    n_batches = math.ceil(len(examples) / batch_size)
    total = n_batches * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / (total + 1))
    losses: list[float] = []
    t0 = time.perf_counter()
    was_training = model.training
    model.train(dropout > 0)
    try:
        with (attached(model, adapter, dropout), attention_kernels(device),
              tqdm(total=total, desc=desc, unit="step", disable=not progress) as bar):
            for _ in range(epochs):
                order = list(range(len(examples)))
                rng.shuffle(order)
                for start in range(0, len(order), batch_size):
                    chunk = order[start : start + batch_size]
                    soft = [teacher[i] if teacher else None for i in chunk]
                    loss = _loss(model, _batch([examples[i] for i in chunk], pad_id, device), soft, kl_weight)
                    if penalty is not None:
                        loss = loss + penalty(adapter).to(loss.device)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    losses.append(loss.item())
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        model.train(was_training)
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    return TrainStats(len(losses), time.perf_counter() - t0, losses[0], losses[-1])
