"""Forward hooks: read MEMIT keys, read and nudge the residual stream.

Keys are the inputs of a layer's down-projection; the residual stream is a decoder
layer's output hidden state. Both are read at chosen (row, position) slots of a
padded batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from sleepwake.inference import CACHE
from sleepwake.models import Architecture


class StopForward(Exception):
    """Raised from a hook once everything needed has been read, to skip later layers."""


def hidden_of(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[index]


def capture(
    arch: Architecture,
    *,
    key_layers: tuple[int, ...] = (),
    hidden_layers: tuple[int, ...] = (),
    stop_after: int | None = None,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], Callable[[], object]]:
    """Install hooks that store full down-proj inputs and layer outputs.

    Returns (keys, hiddens, remove): the dicts are filled during the next forward
    pass with tensors of shape (batch, seq, dim).
    """
    keys: dict[int, torch.Tensor] = {}
    hiddens: dict[int, torch.Tensor] = {}
    handles = []

    for layer in key_layers:
        def pre(_m: nn.Module, args: tuple, layer: int = layer) -> None:
            keys[layer] = args[0].detach()

        handles.append(arch.down_proj(layer).register_forward_pre_hook(pre))
    for layer in set(hidden_layers) | ({stop_after} if stop_after is not None else set()):
        def post(_m: nn.Module, _a: tuple, out: object, layer: int = layer) -> None:
            if layer in hidden_layers:
                hiddens[layer] = hidden_of(out).detach()
            if layer == stop_after:
                raise StopForward

        handles.append(arch.layers[layer].register_forward_hook(post))

    def remove() -> None:
        for h in handles:
            h.remove()

    return keys, hiddens, remove


def run_capture(
    model: nn.Module,
    arch: Architecture,
    batch: dict[str, torch.Tensor],
    *,
    key_layers: tuple[int, ...] = (),
    hidden_layers: tuple[int, ...] = (),
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """One no-grad forward pass that stops after the deepest layer it needs."""
    stop = max((*key_layers, *hidden_layers))
    keys, hiddens, remove = capture(arch, key_layers=key_layers, hidden_layers=hidden_layers, stop_after=stop)
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    except StopForward:
        pass
    finally:
        remove()
    return keys, hiddens


@contextmanager
def add_to_residual(
    arch: Architecture, layer: int, rows: torch.Tensor, cols: torch.Tensor, delta: torch.Tensor
) -> Iterator[None]:
    """Add delta[i] to layer `layer`'s output at (rows[i], cols[i]) during forwards (on
    the device the layer computes on)."""

    def post(_m: nn.Module, _a: tuple, out: object) -> object:
        h = hidden_of(out)
        shift = torch.zeros_like(h)
        at = h.device
        shift = shift.index_put((rows.to(at), cols.to(at)), delta.to(at, h.dtype), accumulate=True)
        h = h + shift
        if isinstance(out, tuple):
            return (h, *out[1:])
        return h

    handle = arch.layers[layer].register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def frozen_prefix(arch: Architecture, layer: int, output: object) -> Iterator[None]:
    """Skip layers 0..`layer` by replaying a cached output of `layer`.

    v* only changes the residual stream after `layer`, so re-running the layers
    before it on every optimisation step is wasted work: layers below become
    identities and `layer` returns `output` (hooks on it still run).
    """
    as_tuple = isinstance(output, tuple)

    def identity(*args: object, **kwargs: object) -> object:
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) if as_tuple else h

    def replay(*_args: object, **_kwargs: object) -> object:
        return output

    saved = []
    for i in range(layer + 1):
        module = arch.layers[i]
        saved.append((module, module.__dict__.get("forward")))
        module.forward = replay if i == layer else identity  # type: ignore[method-assign]
    try:
        yield
    finally:
        for module, old in saved:
            if old is None:
                del module.forward
            else:
                module.forward = old  # type: ignore[method-assign]


def layer_output(model: nn.Module, arch: Architecture, batch: dict[str, object], layer: int) -> object:
    """The raw output object of decoder layer `layer` (tensor or tuple), no grad."""
    got: list[object] = []

    def post(_m: nn.Module, _a: tuple, out: object) -> None:
        got.append(out)
        raise StopForward

    handle = arch.layers[layer].register_forward_hook(post)
    try:
        with torch.no_grad():
            model(**batch, use_cache=CACHE in batch)
    except StopForward:
        pass
    finally:
        handle.remove()
    return got[0]
