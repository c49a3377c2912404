"""The live weights: a frozen base plus low-rank deltas, rebuilt one canonical way.

Everything the model has learned is a low-rank delta ``L @ R`` on some linear map:
MEMIT edits on the down-projections (``A @ B`` per fact), LoRA adapters on any
linear map (``scale·B @ A``). For each module the live weight is

    base + cat(L₁, L₂, …) @ cat(R₁, R₂, …)

with the parts in a fixed order (consolidated adapters by cycle, then MEMIT edits by
fact id). Always computing it this one way, never by adding to or subtracting from
the current weight, means a restart performs the same float operations in the same
order, so the weights come out bitwise equal, and removing a delta is exact.

A 4-bit module (`sleepwake.quantize`) is never written: its weight is the base, and the
delta sum goes beside it, added to its output.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from sleepwake.models import LoadedModel

Factor = tuple[torch.Tensor, torch.Tensor]  # (L: d_out × r, R: r × d_in)


class LiveWeights:
    """Base copies of the modules that carry deltas (None for a 4-bit one), and the
    running delta sums."""

    def __init__(self, lm: LoadedModel, names: Iterable[str] = ()) -> None:
        self.lm = lm
        self.base: dict[str, torch.Tensor | None] = {}
        self.sum: dict[str, torch.Tensor] = {}
        self.track(names)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.base)

    def track(self, names: Iterable[str]) -> None:
        """Start keeping base copies of more modules (before anything edits them)."""
        for n in names:
            if n not in self.base:
                base = self.lm.base_weight(n)
                self.base[n] = None if self.lm.arch.quantized(n) else base
                self.sum[n] = torch.zeros_like(base, dtype=torch.float32)

    def _write(self, name: str) -> None:
        base, delta = self.base[name], self.sum[name]
        if base is None:  # 4-bit: the delta beside the weight (None while it is zero: no work)
            self.lm.model.get_submodule(name).delta = delta if delta.any() else None
        else:
            w = self.lm.arch.weight(name)
            w.copy_((base.float() + delta).to(w.dtype))
        self.lm.weights_version += 1

    def add(self, name: str, parts: Sequence[Factor]) -> None:
        """Add deltas to one module while a MEMIT batch is being solved layer by layer
        (not canonical: `rebuild` once the batch is done)."""
        out = self.sum[name]
        for left, right in parts:
            out.add_(left.to(out.device) @ right.to(out.device))
        self._write(name)

    def restore(self) -> None:
        """Write every tracked module again as base + its delta sum (after another
        memory sharing the model wrote its own)."""
        for n in self.base:
            self._write(n)

    def rebuild(self, factors: Mapping[str, Sequence[Factor]]) -> None:
        """Set every tracked module to base + its `factors` (in the given order)."""
        self.track(factors)
        for n in self.base:
            parts = factors.get(n, ())
            if parts:  # on the module's device, wherever a device_map put it
                left = torch.cat([p[0].to(self.sum[n].device) for p in parts], dim=1)
                right = torch.cat([p[1].to(self.sum[n].device) for p in parts], dim=0)
                torch.mm(left.float(), right.float(), out=self.sum[n])
            else:
                self.sum[n].zero_()
            self._write(n)
