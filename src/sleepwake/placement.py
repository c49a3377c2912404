"""Where each part of a model computes: one device, or several under accelerate's `device_map`.

A model that `from_pretrained(..., device_map=...)` spread over devices carries accelerate
hooks that move each module's inputs to its execution device; an offloaded module
("disk", or "cpu" beside GPUs) keeps its weights on `meta` until its hook loads them for a
pass. Such a model has no one device: inputs go where the embedding computes, and what
belongs to a layer (its MEMIT deltas, Ĉ, keys) lives where that layer computes, so that
no step gathers the model, or its memory, onto one device.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from sleepwake.errors import InvalidRequestError

# transformers' placement strategies (`from_pretrained(device_map=...)`), computed by accelerate.
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")

DeviceMap = str | dict[str, int | str]
K = TypeVar("K")
Where = torch.device | str | Callable[[K], torch.device]
"""One device for everything, or a device per key (a layer, a module name)."""


def check_device_map(value: Any) -> DeviceMap | None:
    """`value` as `from_pretrained` takes it — a strategy, or {module name: GPU index,
    "cpu", "cuda:N" or "disk"} — if this machine can honour it; else an error naming the
    problem, raised before anything loads."""
    if value is None:
        return None
    if isinstance(value, str):
        if value not in STRATEGIES:
            raise InvalidRequestError(f"unknown device_map {value!r}: use one of {', '.join(STRATEGIES)}, "
                                      "or a dict {module name: device}")
        return value
    if not isinstance(value, Mapping) or not value:
        raise InvalidRequestError(f"device_map must be one of {', '.join(STRATEGIES)} or a non-empty dict "
                                  f"{{module name: device}}, got {value!r}")
    out: dict[str, int | str] = {}
    for name, device in value.items():
        if not isinstance(name, str):
            raise InvalidRequestError(f"device_map: module names must be strings, got {name!r}")
        out[name] = _check_device(name, device)
    return out


def _check_device(name: str, device: Any) -> int | str:
    if device == "disk":
        return device
    if isinstance(device, bool) or not isinstance(device, (int, str, torch.device)):
        raise InvalidRequestError(f"device_map[{name!r}]: {device!r} is not a device")
    try:
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InvalidRequestError(f"device_map[{name!r}]: unknown device {device!r} ({exc})") from None
    if dev.type not in ("cpu", "cuda"):
        raise InvalidRequestError(f"device_map[{name!r}]: {device!r}; use a GPU index, 'cpu', 'cuda:N' or 'disk'")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise InvalidRequestError(f"device_map[{name!r}]: {device!r}, but PyTorch sees "
                                  f"{torch.cuda.device_count()} CUDA GPU(s) here")
    return device if isinstance(device, int) else str(dev)


def module_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its accelerate hook's execution device, else where its weights are."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", (hook,)):  # a SequentialHook holds several
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    raise ValueError(f"{type(module).__name__} has no weights to place it by")


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: where its input embedding computes."""
    return module_device(model.get_input_embeddings())


def output_device(model: nn.Module) -> torch.device:
    """Where a model's logits come out: where its LM head computes."""
    return module_device(model.get_output_embeddings())


def offloaded(module: nn.Module) -> bool:
    """Whether `module`'s own weights are not in memory (accelerate loads them for each pass)."""
    return any(p.device.type == "meta" for p in module.parameters(recurse=False))


def spread(model: nn.Module) -> bool:
    """Whether a device_map placed the model's modules on more than one device."""
    return len(set(map(str, (getattr(model, "hf_device_map", None) or {}).values()))) > 1


def place(where: Where, key: Any) -> torch.device | str:
    """The device `where` gives `key`."""
    return where(key) if callable(where) else where
