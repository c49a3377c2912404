"""Ĉ: the uncentred second moment of down-projection inputs (paper eq. 2).

Computed over the project's reference texts in one forward pass for all requested
layers (stopping after the deepest), and cached on disk per (model fingerprint,
layer, settings) so later processes load it in milliseconds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Sequence

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sleepwake.corpus import reference_digest, reference_texts
from sleepwake.inference import pad_right
from sleepwake.memit.trace import run_capture
from sleepwake.models import Architecture
from sleepwake.placement import input_device
from sleepwake.store import write_atomic


def settings_key(n_texts: int, max_tokens: int) -> str:
    raw = f"{reference_digest()}|{n_texts}|{max_tokens}|chat|v2"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def chat_texts(tokenizer: Any) -> list[str]:
    """Questions and answers in the model's chat template.

    Chat edits write keys at chat-template positions; without such text in Ĉ those
    directions would look unused and the solve would spend them freely, changing
    how the model answers every chat question.
    """
    from sleepwake.corpus import world_facts
    from sleepwake.inference import chat_text

    return [chat_text(tokenizer, f.chat_question()) + f"{f.sentence}" for f in world_facts()]


def _path(cache_dir: Path, fingerprint: str, key: str, layer: int) -> Path:
    return cache_dir / "covariance" / fingerprint / key / f"layer{layer:03d}.safetensors"


def compute_covariance(
    model: torch.nn.Module,
    arch: Architecture,
    tokenizer: Any,
    layers: Sequence[int],
    texts: Sequence[str],
    *,
    max_tokens: int = 128,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[dict[int, torch.Tensor], int]:
    """Ĉ for each layer (float32, on the layer's device) and the number of token vectors behind it."""
    device = input_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    enc = [list(tokenizer(t, add_special_tokens=True)["input_ids"])[:max_tokens] for t in texts]
    enc.sort(key=len)  # similar lengths per batch: less padding
    sums = {l: torch.zeros(arch.d_in(l), arch.d_in(l), dtype=torch.float32, device=arch.layer_device(l))
            for l in layers}
    count = 0
    bar = tqdm(total=len(enc), desc="covariance", unit="text", disable=not progress)
    for start in range(0, len(enc), batch_size):
        chunk = enc[start : start + batch_size]
        batch = pad_right(chunk, pad, device)
        keys, _ = run_capture(model, arch, batch, key_layers=tuple(layers))
        mask = batch["attention_mask"].bool()
        for l in layers:
            k = keys[l][mask.to(keys[l].device)].float()
            sums[l].addmm_(k.T, k)
        count += int(mask.sum())
        bar.update(len(chunk))
    bar.close()
    return {l: s / count for l, s in sums.items()}, count


def load_or_compute(
    model: torch.nn.Module,
    arch: Architecture,
    tokenizer: Any,
    layers: Sequence[int],
    *,
    fingerprint: str,
    cache_dir: Path,
    n_texts: int,
    max_tokens: int,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """Cached Ĉ per layer, on the host; the missing layers are computed together in one pass.

    Only Ĉ⁻¹ is used on the layer's device (MEMIT's solve), so a GPU holds one d×d matrix
    per edited layer, not two: 24.5 GiB less for 70B's eight layers of 28,672 inputs."""
    covs = cached(tokenizer, layers, fingerprint=fingerprint, cache_dir=cache_dir, n_texts=n_texts,
                  max_tokens=max_tokens, compute=lambda missing, texts: compute_covariance(
                      model, arch, tokenizer, missing, texts, max_tokens=max_tokens, progress=progress))
    return {l: c.cpu() for l, c in covs.items()}


Compute = Callable[[list[int], list[str]], tuple[dict[int, torch.Tensor], int]]


def cached(tokenizer: Any, layers: Sequence[int], *, fingerprint: str, cache_dir: Path, n_texts: int,
           max_tokens: int, compute: Compute) -> dict[int, torch.Tensor]:
    """Ĉ per layer from the cache, the missing layers computed by `compute(layers, texts)`
    (Ĉ per layer and the token count) and cached: one cache for every backend (PyTorch,
    MLX), since Ĉ depends only on the weights and the texts."""
    key = settings_key(n_texts, max_tokens)
    paths = {l: _path(cache_dir, fingerprint, key, l) for l in layers}
    if all(p.is_file() for p in paths.values()):
        return _load(paths)
    folder = next(iter(paths.values())).parent  # one folder per (model, settings)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".lock")):  # another process computing the same Ĉ: wait for it, then load
        out = _load({l: p for l, p in paths.items() if p.is_file()})
        missing = [l for l in paths if l not in out]
        if not missing:
            return out
        texts = list(reference_texts()[:n_texts]) + chat_texts(tokenizer)
        covs, count = compute(missing, texts)
        for l, c in covs.items():
            p = paths[l]
            p.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(p, lambda tmp: save_file({"cov": c.cpu().contiguous()}, tmp, metadata={"tokens": str(count)}))
            out[l] = c
        return out


def _load(paths: dict[int, Path]) -> dict[int, torch.Tensor]:
    return {l: load_file(str(p))["cov"] for l, p in paths.items()}
