"""4-bit base models (`--quantize nf4`): the learned memory stays exact, beside the 4-bit weights.

transformers loads the decoder's linear maps as bitsandbytes `Linear4bit` (NF4 with double
quantization, as `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True)`; the embeddings and the LM head stay float32). A MEMIT edit
or LoRA adapter is never written into a 4-bit weight: requantizing an edited weight buries
the edit, which is small, in the quantization error, which is not (the paper's
"mixed-precision boundary", §7). A module a memory changes carries its float32 delta beside
its 4-bit weight instead, and adds it to its output: y = W₄·x + Δ·x (`WithDelta`).

bitsandbytes is optional: it is imported only when a scheme is asked for.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sleepwake.errors import InvalidRequestError

SCHEMES = ("nf4",)


def check_scheme(scheme: str | None) -> str | None:
    """`scheme` when it is known and bitsandbytes imports; else an error naming the
    problem, raised before anything loads or changes."""
    if scheme is None:
        return None
    if scheme not in SCHEMES:
        raise InvalidRequestError(f"unknown quantization scheme {scheme!r}; the one supported is 'nf4'")
    bitsandbytes()
    return scheme


def bitsandbytes() -> ModuleType:
    """bitsandbytes, imported without its notice about an optional CPU kernel.

    On a CPU with AVX512-BF16, importing it tries to fetch a faster bf16 kernel from the
    Hugging Face hub (kernels-community), which needs trust_remote_code, and logs a warning
    when it cannot. That kernel is for the bf16 path we turn off anyway (`prepare`)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken native library
        raise InvalidRequestError(
            f"4-bit quantization needs bitsandbytes, which cannot be imported here ({exc}); "
            "install it with: pip install 'sleepwake[quantize]'") from None
    return bitsandbytes


def loading_options(scheme: str, device: torch.device | None) -> dict[str, Any]:
    """What `from_pretrained` is given to load the model in `scheme`, on `device`."""
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    return {"quantization_config": config, "device_map": {"": device or "cpu"}}


class WithDelta(nn.Module):
    """A 4-bit linear map plus `delta`: what a memory has learned on it, an exact float32
    (d_out × d_in) matrix (`weights.LiveWeights` sets it; None when there is none)."""

    delta: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.delta is None:
            return out
        return out + F.linear(x.to(self.delta.dtype), self.delta).to(out.dtype)


@functools.cache
def _with_delta(cls: type) -> type:
    return type(f"{cls.__name__}WithDelta", (WithDelta, cls), {"__module__": __name__})


def prepare(model: nn.Module) -> None:
    """Every 4-bit module of a loaded model becomes a `WithDelta` that computes in float32.

    bitsandbytes repacks a CPU weight for a bf16 kernel at its first inference call; that
    kernel has no backward, so the gradients of MEMIT's v* and of LoRA training through
    the module would be lost (measured: none reached the input). Off, it dequantizes and
    multiplies in float32, forward and backward, at about float32's speed."""
    linear4bit = bitsandbytes().nn.Linear4bit
    for mod in model.modules():
        if isinstance(mod, linear4bit):
            mod.__class__ = _with_delta(type(mod))
            mod.support_avx512bf16_for_cpu = False


def is_quantized(mod: nn.Module) -> bool:
    return isinstance(mod, WithDelta)


def dequantized(mod: nn.Module) -> torch.Tensor:
    """The 4-bit weight of `mod` as float32 (d_out × d_in), in a new tensor."""
    weight = mod.weight
    return bitsandbytes().functional.dequantize_4bit(weight.data, weight.quant_state).float()
