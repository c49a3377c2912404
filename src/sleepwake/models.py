"""Loading a base model without a network, and finding its MLP down-projections.

Where a `--model` value points is `sources`. GGUF weights are dequantised to float32
once and cached as safetensors, so later loads are fast.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import nn

from sleepwake import placement
from sleepwake import quantize as sleepwake_quantize
from sleepwake.config import default_cache_dir
from sleepwake.errors import InvalidRequestError, ModelNotFoundError, UnsupportedArchitectureError
from sleepwake.sources import DEFAULT_MODEL, ModelSource, fingerprint, resolve_model

# transformers releases that turn a GGUF file of this architecture into wrong weights:
# Gemma-3-270M's perplexity on plain English is ~280,000 after 5.17's conversion and ~475
# after 5.21-5.22's, 17.8 after 5.23's (a GPU run's image had 5.17; BENCHMARKS.md, session 32).
_GGUF_FIXED_IN: dict[str, tuple[int, int]] = {"gemma3": (5, 23), "gemma3_text": (5, 23)}


def gguf_conversion_problem(model_type: str, transformers_version: str) -> str | None:
    """Why this transformers cannot convert a GGUF file of `model_type` correctly, or None."""
    fixed = _GGUF_FIXED_IN.get(model_type)
    if fixed is None:
        return None
    try:
        have = tuple(int(part) for part in transformers_version.split(".")[:2])
    except ValueError:
        return None  # a development build: trust it
    if have >= fixed:
        return None
    need = ".".join(map(str, fixed))
    return (f"transformers {transformers_version} converts {model_type} GGUF files into wrong weights "
            f"(the model would answer nonsense); upgrade it: pip install 'transformers>={need}'")


# Edited layers chosen by a sweep with benchmarks/probe.py (30 facts; 4–11 beat 2–7 and 8–15, BENCHMARKS.md).
_DEFAULT_LAYERS: dict[str, tuple[int, ...]] = {
    DEFAULT_MODEL: tuple(range(4, 12)),
}


class ModelLock:
    """The lock on a loaded model that several memories (users) share.

    Reentrant for the thread that holds it, and a hold can be handed over (`detach`):
    a streamed reply takes the model in the request's thread and gives it back in
    whichever thread finishes reading it."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: object = None
        self._depth = 0

    def acquire(self) -> bool:
        me = threading.get_ident()
        with self._cond:
            if self._depth and self._owner == me:
                self._depth += 1
                return True
            self._cond.wait_for(lambda: self._depth == 0)
            self._owner, self._depth = me, 1
        return True

    def release(self) -> None:
        with self._cond:
            if self._depth == 0:
                raise RuntimeError("release of a model lock that is not held")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify()

    def detach(self) -> None:
        """The hold (taken once) no longer belongs to this thread: any thread releases it,
        and this one waits for it like any other."""
        with self._cond:
            if self._depth != 1 or self._owner != threading.get_ident():
                raise RuntimeError("detach needs a single hold by this thread")
            self._owner = object()

    def held(self) -> bool:
        """Whether this thread holds the lock."""
        with self._cond:
            return bool(self._depth) and self._owner == threading.get_ident()

    def __enter__(self) -> "ModelLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    name: str
    fingerprint: str
    arch: "Architecture"
    _pristine: dict[str, torch.Tensor | None] = field(default_factory=dict, repr=False)
    """Per module a `Memory` writes, a copy of its unedited weight; None for a 4-bit module,
    whose weight is never written (its delta goes beside it, `quantize.WithDelta`)."""
    weights_version: int = field(default=0, repr=False)
    """Counts writes to the live weights (`LiveWeights`, `reset_weights`) and changes of the
    hooks that act like weights (`keyed`): what was measured on them, such as perplexity,
    holds while it is unchanged."""
    hooks_digest: str = field(default="", repr=False)
    """A name for the hooks installed now that change the model's outputs (`keyed`)."""
    hooks: list = field(default_factory=list, repr=False)  # their handles
    keyed: Any = field(default=None, repr=False)  # the `keyed.KeyedMemory` they read
    path: Path | None = None
    """The Hugging Face directory the weights were loaded from (for GGUF, the converted copy
    in the cache): what an exported adapter names as its base model."""
    lock: ModelLock = field(default_factory=ModelLock, repr=False, compare=False)
    """Held by whoever uses the model: the memories (users) that share it take turns."""
    shared: dict = field(default_factory=dict, repr=False, compare=False)
    """What the memories of this model compute once for all of them (Ĉ and its inverse)."""
    quantize: str | None = None
    """The scheme its decoder's linear maps were loaded in (`quantize`), or None: float."""
    device_map: placement.DeviceMap | None = None
    """The `device_map` it was placed with (`placement`), or None: one device."""

    def base_weight(self, key: int | str) -> torch.Tensor:
        """The unedited weight (d_out × d_in) of a module name, or of a layer's down-projection.

        Copied the first time it is asked for, before anything edits it, so several
        `Memory` objects can share one loaded model without mistaking each other's
        edits for the base. A 4-bit module's is its weight dequantized, made anew at
        each call (it is never edited, and a float copy would undo the saving). A module
        that a device_map offloaded has no weight in memory to edit: refused, naming it.
        """
        name = self.arch.down_name(key) if isinstance(key, int) else key
        if name not in self._pristine:
            self.arch.check_writable(name)
            self._pristine[name] = None if self.arch.quantized(name) else self.arch.weight(name).clone()
        base = self._pristine[name]
        return self.arch.weight(name) if base is None else base

    def weights_digest(self) -> str:
        """A name for the live weights: equal for bitwise-equal weights, in any process.

        The model's fingerprint and every module that differs from its base weight
        (one that a `Memory` wrote back to base counts as unchanged), or, 4-bit, every
        delta beside a module's weight."""
        h = hashlib.blake2b(self.fingerprint.encode(), digest_size=16)
        h.update(self.hooks_digest.encode())
        for name, base in sorted(self._pristine.items()):
            if base is None:
                w = self.model.get_submodule(name).delta
                if w is None:
                    continue
            else:
                w = self.arch.weight(name).detach()
                if torch.equal(w, base):
                    continue
            h.update(name.encode())
            h.update(str(w.dtype).encode())
            h.update(w.cpu().contiguous().view(torch.uint8).numpy())
        return h.hexdigest()

    def reset_weights(self) -> None:
        """Every module a `Memory` has written to back to its base weight, for the next
        user of a shared model (a `Memory` made on it rebuilds its own weights anyway)."""
        with torch.no_grad():
            for name, w in self._pristine.items():
                if w is None:
                    self.model.get_submodule(name).delta = None
                else:
                    self.arch.weight(name).copy_(w)
        for handle in self.hooks:
            handle.remove()
        self.hooks, self.hooks_digest, self.keyed = [], "", None
        self.weights_version += 1

    def written(self) -> tuple[str, ...]:
        """The modules a `Memory` has written to (or is about to): those with a base copy."""
        return tuple(self._pristine)

    def private_copy(self) -> "LoadedModel":
        """A copy of this model to change apart from it (a user's sleep, while the other
        users keep answering from this one), without the hooks installed here. It has its
        own module tree and its own copy of every down-projection and of every weight a
        `Memory` has written; the other parameters and buffers are this model's (read
        only), so it costs the down-projections (SmolLM2-135M: 106 MB of 540 MB). A weight
        that no memory had written is made its own when a memory first writes it there
        (`base_weight`); one that a memory of this model first writes after the copy was
        made (only a LoRA adapter does: `consolidation="lora"`) is seen by the copy."""
        own = {*self._pristine, *(self.arch.down_name(l) for l in range(self.arch.n_layers))}
        mine = {id(self.model.get_submodule(n).weight) for n in own}
        memo: dict[int, Any] = {id(t): t for t in (*self.model.parameters(), *self.model.buffers())
                                if id(t) not in mine}
        model = copy.deepcopy(self.model, memo)
        for m in model.modules():  # the keyed hooks of this model read its own memory
            for hooks in (m._forward_hooks, m._forward_pre_hooks, m._forward_hooks_with_kwargs,
                          m._forward_pre_hooks_with_kwargs, m._forward_hooks_always_called):
                hooks.clear()
        arch = Architecture(model)
        pristine = dict(self._pristine)
        for n in own - set(pristine):  # down-projections no memory wrote yet: base now (none offloaded)
            if not placement.offloaded(model.get_submodule(n)):
                pristine[n] = None if arch.quantized(n) else arch.weight(n).clone()
        return _PrivateModel(model, self.tokenizer, self.name, self.fingerprint, arch, pristine,
                             weights_version=self.weights_version + 1, path=self.path, shared=self.shared,
                             quantize=self.quantize, device_map=self.device_map)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embedding's device (with a device_map, layers may be elsewhere)."""
        return placement.input_device(self.model)

    def default_layers(self) -> tuple[int, ...]:
        return default_layers(self.name, self.arch.n_layers)


class _PrivateModel(LoadedModel):
    """`LoadedModel.private_copy`: a module is made its own before it is first written."""

    def base_weight(self, key: int | str) -> torch.Tensor:
        name = self.arch.down_name(key) if isinstance(key, int) else key
        if name not in self._pristine and not self.arch.quantized(name):  # a 4-bit weight is never written
            self.arch.check_writable(name)
            mod = self.model.get_submodule(name)
            mod.weight = nn.Parameter(mod.weight.detach().clone(), requires_grad=False)
        return super().base_weight(name)


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Within the block, gguf-py parses each file once, faster, and builds each tensor-name map once.

    transformers parses the whole GGUF header again for the config, the tokenizer and
    the weights, and gguf-py reads array fields element by element, each element a
    slice of a `numpy.memmap` (whose slicing runs Python code): for Gemma-3's 262k-token
    vocabulary one parse took ~25 s of a conversion that took ~80 s. It also asks for
    the tensor-name map once per module of the model (397 for SmolLM2), and each map
    formats every tensor name of every layer: 6 s of a 22 s conversion."""
    import gguf
    import numpy as np

    class Reader(gguf.GGUFReader):
        """Slices a plain ndarray view of the same mapped file (C-level slicing)."""

        @property
        def data(self) -> Any:
            return self._plain

        @data.setter
        def data(self, value: Any) -> None:
            self._plain = value.view(np.ndarray)

    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: str | os.PathLike[str], mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = Reader(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.cache(original_map)  # the maps are only read
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map


@contextlib.contextmanager
def _hf_bars(progress: bool) -> Iterator[None]:
    """transformers' progress bars (loading, GGUF dequantising, writing shards) off
    within the block unless `progress`."""
    if progress:
        yield
        return
    # The GGUF dequantiser draws its own tqdm bar, which the logging switch misses.
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    saved_tqdm = gguf_utils.tqdm
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = functools.partial(saved_tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = saved_tqdm
        hf_logging.enable_progress_bar()


def _convert_gguf(source: ModelSource, target: Path) -> None:
    """Dequantise a GGUF file to a float32 safetensors directory, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _gguf_parsed_once():
            tok = AutoTokenizer.from_pretrained(source.path.parent, gguf_file=source.path.name)
            model = AutoModelForCausalLM.from_pretrained(
                source.path.parent, gguf_file=source.path.name, dtype=torch.float32
            )
    except Exception as exc:  # noqa: BLE001
        raise ModelNotFoundError(f"cannot load GGUF file {source.path}: {exc}") from exc
    import transformers

    problem = gguf_conversion_problem(model.config.model_type, transformers.__version__)
    if problem:
        raise ModelNotFoundError(f"cannot load GGUF file {source.path}: {problem}")
    # The GGUF quantisation note would make a plain from_pretrained try to re-read GGUF.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # the weights are plain float32 now
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "sleepwake_source.json").write_text(
            json.dumps({"gguf": str(source.path), "name": source.name}), encoding="utf-8"
        )
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "sleepwake_source.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process converted it first: keep theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """Where the model runs. "auto" is a CUDA GPU if PyTorch sees one, else the CPU;
    None leaves the model where it loads (the CPU). CUDA without a GPU is refused, so
    the caller can stop before anything is loaded or written."""
    if device is None:
        return None
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidRequestError(f"unknown device {device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("no CUDA GPU is available to PyTorch here (torch.cuda.is_available() is False); "
                                  "use the CPU, or 'auto'")
    return device


def converted(spec: str | os.PathLike[str] | None = None, *, cache_dir: str | os.PathLike[str] | None = None,
              progress: bool = True) -> tuple[ModelSource, Path, str]:
    """The model's source, the Hugging Face directory its weights load from (a GGUF file is
    converted into the cache first) and its fingerprint: what every backend loads."""
    from transformers.utils import logging as hf_logging

    source = resolve_model(spec)
    fp = fingerprint(source)
    path = source.path
    hf_logging.set_verbosity_error()  # keep "generation flags" chatter off the user's terminal
    if source.kind == "gguf":
        path = Path(cache_dir or default_cache_dir()) / "models" / fp
        if not (path / "config.json").is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(path) + ".lock"), _hf_bars(progress):  # a second process waits, then loads it
                if not (path / "config.json").is_file():
                    _convert_gguf(source, path)
    return source, path, fp


def load_model(
    spec: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    quantize: str | None = None,
    device_map: placement.DeviceMap | None = None,
) -> LoadedModel:
    """Load a base model for editing: frozen, in eval mode, float32 by default, on
    `device` (see `resolve_device`), or placed over several by accelerate with
    `device_map` ("auto", or a dict as transformers takes it; `placement`).
    `quantize="nf4"` loads the decoder's linear maps in 4-bit NF4 (see
    `sleepwake.quantize`). All are checked before anything loads."""
    device_map = placement.check_device_map(device_map)
    if device_map is not None and device is not None:
        raise InvalidRequestError(f"device={str(device)!r} and device_map={device_map!r}: give one of them "
                                  "(a device_map places every part of the model)")
    device = resolve_device(device)
    quantize = sleepwake_quantize.check_scheme(quantize)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, path, fp = converted(spec, cache_dir=cache_dir, progress=progress)
    options = sleepwake_quantize.loading_options(quantize, device) if quantize else {}
    if device_map is not None:  # offloaded parts read from this folder, if they are not safetensors already
        options |= {"device_map": device_map,
                    "offload_folder": str(Path(cache_dir or default_cache_dir()) / "offload" / fp)}
    with _hf_bars(progress):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **options)
        except Exception as exc:  # noqa: BLE001
            raise ModelNotFoundError(f"cannot load model from {path}: {exc}") from exc
    if quantize:
        sleepwake_quantize.prepare(model)  # already on `device`
    elif device is not None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, source.name, fingerprint(source, quantize), Architecture(model),
                       path=Path(path).resolve(), quantize=quantize, device_map=device_map)


def default_layers(name: str, n_layers: int) -> tuple[int, ...]:
    """Edited layers: the swept choice for known models, else an early-middle band.

    Factual recall in MLPs concentrates in early-to-middle layers (ROME/MEMIT causal
    tracing); the paper uses 8–15 of 28 (3B) and 12–19 of 32 (8B).
    """
    if name in _DEFAULT_LAYERS and max(_DEFAULT_LAYERS[name]) < n_layers:
        return _DEFAULT_LAYERS[name]
    if n_layers <= 4:
        return tuple(range(n_layers))
    start = max(1, round(0.15 * n_layers))
    count = max(2, min(8, round(0.3 * n_layers)))
    return tuple(range(start, min(n_layers - 1, start + count)))


# --- architecture adapters -------------------------------------------------------

@dataclass(frozen=True)
class ArchSpec:
    """Where a family keeps its decoder layers and MLP down-projection."""

    layers: tuple[str, ...]  # candidate attribute paths to the ModuleList
    down: str  # path inside one decoder layer
    post_norm: str | None = None  # a norm between the down-projection and the residual stream


_LLAMA_LIKE = ArchSpec(("model.layers", "model.language_model.layers", "language_model.model.layers"), "mlp.down_proj")
# Gemma 2/3 normalise the MLP output (post_feedforward_layernorm) before adding it.
_GEMMA_POST_NORM = ArchSpec(_LLAMA_LIKE.layers, _LLAMA_LIKE.down, post_norm="post_feedforward_layernorm")
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _GEMMA_POST_NORM,
    "gemma3": _GEMMA_POST_NORM,
    "gemma3_text": _GEMMA_POST_NORM,
    "phi3": _LLAMA_LIKE,
    "gpt2": ArchSpec(("transformer.h",), "mlp.c_proj"),
}


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _has(obj: Any, path: str) -> bool:
    try:
        _get(obj, path)
    except AttributeError:
        return False
    return True


def is_linear(mod: nn.Module) -> bool:
    """A linear map: nn.Linear (4-bit ones too), or GPT-2's Conv1D (the same map, weight stored transposed)."""
    return isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"


def linear_shape(mod: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a linear map, however its weight is stored (Conv1D: transposed; 4-bit: packed)."""
    if type(mod).__name__ == "Conv1D":
        return mod.weight.shape[1], mod.weight.shape[0]
    return mod.out_features, mod.in_features


class Architecture:
    """Uniform access to decoder layers and down-projection weights of one model."""

    def __init__(self, model: nn.Module) -> None:
        model_type = getattr(model.config, "model_type", None)
        spec = ARCHITECTURES.get(model_type or "")
        if spec is None:
            raise UnsupportedArchitectureError(
                f"model type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
            )
        found = [p for p in spec.layers if _has(model, p)]
        if not found:
            raise UnsupportedArchitectureError(f"cannot find the decoder layers of this {model_type} model")
        self.model_type: str = model_type
        self.spec = spec
        self.model = model
        self.layers_path: str = found[0]
        self.layers: nn.ModuleList = _get(model, found[0])

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def down_name(self, layer: int) -> str:
        """The down-projection's module name, relative to the model (PEFT's naming)."""
        return f"{self.layers_path}.{layer}.{self.spec.down}"

    def down_proj(self, layer: int) -> nn.Module:
        """The module whose input is the MEMIT key and whose weight MEMIT edits."""
        return _get(self.layers[layer], self.spec.down)

    def post_norm(self, layer: int) -> nn.Module | None:
        """The norm applied to the down-projection's output before the residual add, if any."""
        return _get(self.layers[layer], self.spec.post_norm) if self.spec.post_norm else None

    def linear_names(self) -> list[str]:
        """Every linear map inside the decoder layers: where LoRA adapters attach."""
        return [
            f"{self.layers_path}.{name}"
            for name, mod in self.layers.named_modules()
            if is_linear(mod)
        ]

    def device(self, name: str) -> torch.device:
        """Where a module computes (`placement.module_device`): what belongs to it goes there."""
        return placement.module_device(self.model.get_submodule(name))

    def layer_device(self, layer: int) -> torch.device:
        """Where a layer's down-projection computes: its MEMIT deltas, keys and Ĉ live there."""
        return self.device(self.down_name(layer))

    def check_writable(self, name: str) -> None:
        """Refuses a module whose weight a device_map offloaded: it is not in memory to be written."""
        if placement.offloaded(self.model.get_submodule(name)):
            raise InvalidRequestError(
                f"{name} is offloaded by the device_map (its weight is loaded from disk or host memory for "
                "each pass), so its memory cannot be written there; place the edited layers on a device "
                "(a GPU, or 'cpu' when no GPU is in the map)")

    def weight(self, name: str) -> torch.Tensor:
        """A module's weight as (d_out, d_in), a view onto the parameter (Conv1D stores (in, out));
        of a 4-bit module, its weight dequantized to float32, in a new tensor."""
        mod = self.model.get_submodule(name)
        if sleepwake_quantize.is_quantized(mod):
            return sleepwake_quantize.dequantized(mod)
        w = mod.weight.data
        return w.t() if type(mod).__name__ == "Conv1D" else w

    def quantized(self, name: str) -> bool:
        """Whether a module's weight is 4-bit (`sleepwake.quantize`): never written, its delta beside it."""
        return sleepwake_quantize.is_quantized(self.model.get_submodule(name))

    def shape(self, name: str) -> tuple[int, int]:
        """A module's (d_out, d_in)."""
        return linear_shape(self.model.get_submodule(name))

    def down_weight(self, layer: int) -> torch.Tensor:
        """The down-projection weight as (d_out, d_in), a view onto the parameter."""
        return self.weight(self.down_name(layer))

    def d_in(self, layer: int) -> int:
        return self.shape(self.down_name(layer))[1]

    def d_out(self, layer: int) -> int:
        return self.shape(self.down_name(layer))[0]
