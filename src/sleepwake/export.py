"""The whole learned memory as one PEFT LoRA adapter, for engines that read only LoRA
(`sleepwake export`, `Memory.export_adapter`): consolidated adapters, the live keyed
entries solved into a LoRA part, and the active MEMIT edits taken over as they are."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sleepwake.errors import InvalidRequestError, StoreError
from sleepwake.memit.solve import inverse_covariance, solve_update, through_post_norm
from sleepwake.sleep.cycle import takeover
from sleepwake.sleep.lora import CONFIG_FILE, Adapter, combine, from_factors

if TYPE_CHECKING:
    from sleepwake.memory import Memory


def export_adapter(mem: Memory, path: str | os.PathLike[str], max_rank: int | None = None) -> Path:
    """Write `mem`'s learned memory as one adapter directory. Its base model is the local
    directory the weights were loaded from, so `peft.AutoPeftModelForCausalLM.from_pretrained(path)`
    loads it as is. With `max_rank`, each module's delta is cut to its best approximation
    of at most that rank (truncated SVD): smaller, and approximate."""
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
        raise InvalidRequestError(f"max_rank must be a positive integer, got {max_rank!r}")
    path = Path(path).expanduser()
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / CONFIG_FILE).exists())):
        raise StoreError(f"{path} exists and is not an adapter directory; choose a new one")
    memit = takeover(mem, {i: mem._edits[i] for i in sorted(mem._edits)})
    keyed = keyed_as_lora(mem)
    parts = [*mem._adapters, *([keyed] if keyed else []), *([memit] if memit else [])]
    if not parts:
        raise StoreError("nothing to export: the memory is empty")
    adapter = combine(parts)
    if max_rank is not None:
        adapter = adapter.truncated(max_rank)
    try:
        adapter.save(path, str(mem.lm.path or mem.lm.name))
    except OSError as exc:  # the save is atomic: nothing was written
        raise StoreError(f"cannot write the adapter to {path}: {exc.strerror or exc}") from exc
    return path


def keyed_as_lora(mem: Memory) -> Adapter | None:
    """The live keyed entries as one LoRA part on their layer's down-projection: a MEMIT
    solve (eq. 3–4) that writes each entry's δ at its keys. Exact at those keys up to λĈ;
    unlike the hook it also acts a little elsewhere, and it does not grow the way the hook does."""
    live = mem.keyed_live()
    if live is None:
        return None
    layer = live.layer
    arch = mem.lm.arch
    at = arch.layer_device(layer)
    keys = torch.cat([e.keys.to(at) for e in live.entries.values()])
    deltas = torch.cat([e.delta.to(at).expand(len(e.keys), -1) for e in live.entries.values()])
    post = arch.post_norm(layer)
    if post is not None:  # a residual change as a down-projection output change
        with torch.no_grad():
            out = keys.float() @ mem.lm.base_weight(layer).float().T
        deltas = through_post_norm(post, out, deltas)
    cov_inv = inverse_covariance(mem.covariances()[layer].to(at))
    a, b = solve_update(deltas, keys, cov_inv, mem.config.memit.lambda_reg)
    return from_factors({arch.down_name(layer): (a, b)})
