"""A base model on MLX arrays, loaded from the same cached safetensors as the PyTorch backend.

mlx-lm gives the model definition (Llama: the default SmolLM2-135M); nothing here asks a
hub. What the PyTorch backend does with forward hooks (read a down-projection's input,
add δ after a layer, the keyed memory) is done by two thin wrappers that read one shared
`Taps` object, so plain `model(ids, cache=...)` calls, generation included, see it.

Memories share an `MlxModel` as they share a `LoadedModel` on PyTorch: each makes its own
weights live (`Live`, `weights_version`) under the model's `lock`; a sleep runs on a
`private_copy`, which shares the base arrays (MLX arrays are immutable: nothing is copied).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import torch
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model as mlx_lm_load

from sleepwake.decoding import GREEDY, Sampling
from sleepwake.facts import mentions_for_good
from sleepwake.errors import ModelNotFoundError, UnsupportedArchitectureError
from sleepwake.models import ModelLock, converted, default_layers

SUPPORTED = ("llama", "gemma3_text")  # the model types whose blocks and MLP mlx-lm lays out as this module expects


@dataclass
class KeyedTable:
    """A keyed memory (`sleepwake.keyed.KeyedMemory`) as MLX arrays, for the taps."""

    layer: int
    match_layer: int
    threshold: float
    head_threshold: float
    keys: mx.array  # unit rows, n × d_in
    heads: mx.array  # unit rows (zeros: no head)
    backs: np.ndarray  # n, how many tokens back the head is read
    deltas: mx.array  # m × d_model
    owner: mx.array  # n, the δ row of each key


@dataclass
class Taps:
    """What forward passes read and add beside the plain model; empty: the plain model."""

    capture: set[int] = field(default_factory=set)
    seen: dict[int, tuple[mx.array, mx.array]] = field(default_factory=dict)  # layer -> down-projection in, out
    add: dict[int, mx.array] = field(default_factory=dict)  # layer -> added to its block's output
    keyed: KeyedTable | None = None
    memit: dict[int, tuple[mx.array, mx.array]] = field(default_factory=dict)  # layer -> (A, B) of the live sums
    lora: dict[int, list[tuple[mx.array, mx.array]]] = field(default_factory=dict)  # layer -> [(L, R)]: + x·Rᵀ·Lᵀ
    hit: tuple[mx.array, mx.array] | None = None  # per position: the keyed δ row, and whether one matched
    tail: mx.array | None = None  # the last unit keys of a cached decode, where heads are read
    continuing: bool = False

    def match(self, x: mx.array) -> None:
        """Which positions of `x` (the match layer's down-projection input) read a keyed entry
        (`sleepwake.keyed._match`: the best key with cosine ≥ threshold, and its head that
        many tokens back ≥ head threshold)."""
        t = self.keyed
        unit = x / mx.maximum(mx.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        if self.tail is None or not self.continuing:
            seen = unit
        else:  # after a cached prefix; one prefix row serves every row of a batch (v*'s shared chat prefix)
            seen = mx.concatenate([mx.broadcast_to(self.tail, (unit.shape[0], *self.tail.shape[1:])), unit], axis=1)
        n, total = unit.shape[1], seen.shape[1]
        sims = unit @ t.keys.T
        ok = sims >= t.threshold
        score = sims
        for back in sorted(set(t.backs.tolist()) - {0}):
            mine = t.backs == back  # the keys whose head is `back` tokens earlier
            cols = mx.array(np.nonzero(mine)[0])
            earlier = mx.pad(seen, [(0, 0), (back, 0), (0, 0)])[:, total - n:total]
            heads = mx.zeros(sims.shape).at[..., cols].add(earlier @ t.heads[cols].T)
            ok = mx.where(mx.array(mine), ok & (heads >= t.head_threshold), ok)
            score = score + heads
        reach = int(t.backs.max())
        self.tail = seen[:, -reach:] if reach else None
        score = mx.where(ok, score, -mx.inf)
        best = mx.max(score, axis=-1)
        hit = mx.isfinite(best)
        self.hit = (t.owner[mx.argmax(score, axis=-1)], hit) if bool(mx.any(hit)) else None


@dataclass
class Live:
    """What a memory makes the model read: each layer's down-projection delta (base + it),
    the keyed table and the MEMIT factors it takes back out where an entry reads."""

    deltas: dict[int, mx.array]
    keyed: KeyedTable | None
    memit: dict[int, tuple[mx.array, mx.array]]


class _Down(nn.Module):
    """A down-projection that shows its input to the taps (the MEMIT key), adds the LoRA
    parts a sleep trains (`mlx.lora`: factors, so gradients reach them) and, where the
    keyed memory reads a position, takes that layer's MEMIT delta back out there."""

    def __init__(self, linear: nn.Module, layer: int, taps: Taps) -> None:
        super().__init__()
        self.linear = linear
        self._layer, self._taps = layer, taps

    def __call__(self, x: mx.array) -> mx.array:
        taps, layer = self._taps, self._layer
        if taps.keyed is not None and layer == taps.keyed.match_layer:
            taps.match(x)
        out = self.linear(x)
        for left, right in taps.lora.get(layer, ()):
            out = out + (x @ right.T) @ left.T
        if taps.hit is not None and layer in taps.memit:
            a, b = taps.memit[layer]
            out = out - ((x @ b.T) @ a.T) * taps.hit[1][..., None]
        if layer in taps.capture:
            taps.seen[layer] = (x, out)
        return out


class _Block(nn.Module):
    """A decoder layer whose output gets what the taps add there (v*'s δ, a keyed δ)."""

    def __init__(self, block: nn.Module, layer: int, taps: Taps) -> None:
        super().__init__()
        self.block = block
        self._layer, self._taps = layer, taps
        self.use_sliding = getattr(block, "use_sliding", False)  # what mlx-lm's make_cache asks a layer

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        taps, layer = self._taps, self._layer
        if layer == 0:  # a new pass: what the keyed memory matched belongs to the last one
            taps.hit = None
            taps.continuing = cache is not None and cache.offset > 0
        h = self.block(x, mask, cache)
        if layer in taps.add:
            h = h + taps.add[layer]
        if taps.keyed is not None and layer == taps.keyed.layer and taps.hit is not None:
            rows, ok = taps.hit
            h = h + taps.keyed.deltas[rows] * ok[..., None]
        return h


class TorchNames:
    """An MLX model's down-projections as `models.Architecture` names them for PyTorch: what
    a LoRA adapter written from an MLX memory (`export`) is keyed by, so PEFT loads it onto
    the same model in transformers. Everything lives on the CPU."""

    def __init__(self, mm: "MlxModel") -> None:
        self._mm = mm

    def down_name(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.down_proj"  # Llama's and Gemma's, in transformers

    def layer_of(self, name: str) -> int | None:
        """The layer whose down-projection `name` is, or None for any other module."""
        parts = name.split(".")
        ok = len(parts) == 5 and parts[3:] == ["mlp", "down_proj"] and parts[2].isdigit()
        return int(parts[2]) if ok and self.down_name(int(parts[2])) == name else None

    def shape(self, name: str) -> tuple[int, int]:
        return tuple(self._mm.down(int(name.split(".")[2])).weight.shape)

    def device(self, name: str) -> torch.device:
        return torch.device("cpu")

    def layer_device(self, layer: int) -> torch.device:
        return torch.device("cpu")

    def post_norm(self, layer: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self._mm.post_norm(layer)


class MlxModel:
    """The default model (or another Llama-type one) on MLX, with the names the store needs.

    `name` and `fingerprint` are the PyTorch backend's for the same weights, so the two
    backends share homes and cached Ĉ."""

    def __init__(self, model: nn.Module, tokenizer: Any, name: str, fingerprint: str, path: Path) -> None:
        self.model, self.tokenizer, self.name, self.fingerprint, self.path = model, tokenizer, name, fingerprint, path
        self.taps = Taps()
        self.shared: dict = {}  # what the memories made on this model compute once (Ĉ⁻¹)
        self.lock = ModelLock()
        self.weights_version = 0  # bumped whenever a memory makes its weights live (`load`)
        self._params = model.parameters()  # the base arrays, for a private copy
        self.arch = TorchNames(self)
        inner = model.model
        self.n_layers = len(inner.layers)
        for i, block in enumerate(inner.layers):
            block.mlp.down_proj = _Down(block.mlp.down_proj, i, self.taps)
            inner.layers[i] = _Block(block, i, self.taps)
        ends = json.loads((path / "generation_config.json").read_text()).get("eos_token_id") \
            if (path / "generation_config.json").is_file() else None
        # Where generation stops: the generation config's end tokens, as transformers' generate.
        self.eos = {tokenizer.eos_token_id, *(ends if isinstance(ends, list) else [ends] if ends is not None else [])}
        self.base = {l: self.down(l).weight for l in range(self.n_layers)}  # arrays are immutable: no copy needed

    def default_layers(self) -> tuple[int, ...]:
        return default_layers(self.name, self.n_layers)

    def down(self, layer: int) -> nn.Linear:
        return self.model.model.layers[layer].block.mlp.down_proj.linear

    def base_weight(self, layer: int) -> torch.Tensor:
        """A layer's unedited down-projection weight (d_out × d_in), as torch."""
        return torch.from_numpy(np.array(self.base[layer], dtype=np.float32))

    def post_norm(self, layer: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The norm between the layer's down-projection and the residual stream (Gemma's
        post-feedforward RMSNorm), as a torch function for `memit.solve.through_post_norm`."""
        norm = getattr(self.model.model.layers[layer].block, "post_feedforward_layernorm", None)
        if norm is None:
            return None
        gain, eps = 1 + torch.from_numpy(np.array(norm.weight, dtype=np.float32)), norm.eps
        return lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain

    def set_delta(self, layer: int, delta: mx.array | None) -> None:
        """The layer's down-projection = base + `delta` (d_out × d_in), or base."""
        self.down(layer).weight = self.base[layer] if delta is None else self.base[layer] + delta

    def load(self, live: Live) -> int:
        """Make `live` the model's weights; returns the new `weights_version`."""
        for layer in range(self.n_layers):
            self.set_delta(layer, live.deltas.get(layer))
        self.taps.keyed, self.taps.memit = live.keyed, live.memit
        self.weights_version += 1
        return self.weights_version

    def private_copy(self) -> "MlxModel":
        """The same model on its own weights and taps (a sleep's), sharing the base arrays,
        the tokenizer and what memories computed once on it (`shared`)."""
        net = type(self.model)(self.model.args)
        net.update(self._params)
        copy = MlxModel(net, self.tokenizer, self.name, self.fingerprint, self.path)
        copy.shared = self.shared
        return copy

    # --- forward passes -------------------------------------------------------------

    def embed(self, ids: mx.array) -> mx.array:
        """The first layer's input: token embeddings (Gemma's scaled by √d, as its model does,
        rounded through bfloat16)."""
        h = self.model.model.embed_tokens(ids)
        if self.model.model_type.startswith("gemma"):
            h = h * mx.array(self.model.args.hidden_size**0.5, mx.bfloat16).astype(h.dtype)
        return h

    def blocks(self, h: mx.array, start: int, stop: int, caches: Sequence[Any] | None = None) -> mx.array:
        """Layers start … stop−1 on hidden states `h` (right-padded rows: causal attention
        keeps the pads from every real position), after what `caches` (one per layer run)
        hold, if given. Every layer sees the whole causal past: Gemma's sliding-window
        layers see the same within their 512 tokens, which no pass here exceeds."""
        mask = "causal" if h.shape[1] > 1 else None
        for i, block in enumerate(self.model.model.layers[start:stop]):
            h = block(h, mask, caches[i] if caches is not None else None)
        return h

    def logits(self, h: mx.array) -> mx.array:
        """The final norm and LM head on hidden states (the last layer's output)."""
        h = self.model.model.norm(h)
        if "lm_head" not in self.model:  # tied to the embeddings
            return self.model.model.embed_tokens.as_linear(h)
        return self.model.lm_head(h)

    def capture(self, ids: mx.array, layers: Sequence[int], hidden: int | None = None
                ) -> tuple[dict[int, tuple[mx.array, mx.array]], mx.array | None]:
        """The down-projection inputs and outputs of `layers` and, if asked, the output of
        layer `hidden`, running only as deep as needed."""
        self.taps.capture, self.taps.seen = set(layers), {}
        try:
            stop = max([*layers, *([hidden] if hidden is not None else [])]) + 1
            h = self.blocks(self.embed(ids), 0, stop)
            seen = dict(self.taps.seen)
        finally:
            self.taps.capture, self.taps.seen = set(), {}
        return seen, (h if hidden is not None else None)

    def generate(self, ids: Sequence[int], max_new_tokens: int, until: str | None = None) -> str:
        """Greedy continuation of one encoded prompt, decoded without special tokens;
        `until` (an expected object) ends it once it names the object for good, as
        `inference.generate` does for recall checks."""
        out: list[int] = []
        for tok in itertools.islice(self.stream(ids, GREEDY), max_new_tokens):
            out.append(tok)
            if until is not None and mentions_for_good(self.tokenizer.decode(out, skip_special_tokens=True), until):
                break
        return self.tokenizer.decode(out, skip_special_tokens=True)

    def stream(self, ids: Sequence[int], sampling: Sampling) -> Iterator[int]:
        """The tokens of a reply to the prompt `ids`, one per step, until the model ends the
        turn: greedy, or drawn at the sampling's temperature within its top-p (numpy's own
        generator, seeded by `sampling.seed`: the global random state is not touched).
        What `decoding.Decoding` reads on MLX."""
        rng = None if sampling.greedy else np.random.default_rng(
            None if sampling.seed is None else sampling.seed % 2**64)
        cache = make_prompt_cache(self.model)
        logits = self.model(mx.array([list(ids)]), cache=cache)
        while True:
            last = logits[0, -1]
            if rng is None:
                tok = int(mx.argmax(last))
            else:
                p = np.array(mx.softmax(last.astype(mx.float32) / sampling.temperature), dtype=np.float64)
                if sampling.top_p < 1:  # the most likely tokens, until their probability reaches top_p
                    order = np.argsort(-p)
                    top = np.zeros_like(p)
                    keep = order[np.cumsum(p[order]) - p[order] < sampling.top_p]
                    top[keep] = p[keep]
                    p = top
                tok = int(rng.choice(len(p), p=p / p.sum()))
            if tok in self.eos:
                return
            yield tok
            logits = self.model(mx.array([[tok]]), cache=cache)

    def perplexity(self, ids: Sequence[int], window: int = 512) -> float:
        """Token-level perplexity of `ids` in non-overlapping windows (`evaluate.perplexity`)."""
        nll, count = 0.0, 0
        for start in range(0, len(ids) - 1, window):
            chunk = list(ids[start:start + window + 1])
            if len(chunk) < 2:
                break
            logits = self.logits(self.blocks(self.embed(mx.array([chunk[:-1]])), 0, self.n_layers))[0]
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            nll -= float(mx.take_along_axis(logp, mx.array(chunk[1:])[:, None], axis=1).sum())
            count += len(chunk) - 1
        return math.exp(nll / count)

    def object_is_top(self, seqs: Sequence[tuple[Sequence[int], int]]) -> list[tuple[bool, int]]:
        """For each (ids, prompt length): is every token after the prompt the top prediction,
        and which token is top after the last one? (`evaluate._object_is_top`: one
        teacher-forced pass.)"""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        n = max(len(ids) for ids, _ in seqs)
        batch = np.full((len(seqs), n), pad, dtype=np.int32)
        for i, (ids, _) in enumerate(seqs):
            batch[i, : len(ids)] = ids
        h = self.blocks(self.embed(mx.array(batch)), 0, self.n_layers)
        rows = [i for i, (ids, p) in enumerate(seqs) for _ in range(p, len(ids))]
        cols = [t - 1 for ids, p in seqs for t in range(p, len(ids))]
        want = np.array([ids[t] for ids, p in seqs for t in range(p, len(ids))])
        rows_all = rows + list(range(len(seqs)))
        cols_all = cols + [len(ids) - 1 for ids, _ in seqs]  # the token after the object
        top = np.array(mx.argmax(self.logits(h[mx.array(rows_all), mx.array(cols_all)]), axis=-1))
        ok = [True] * len(seqs)
        for r, good in zip(rows, top[: len(rows)] == want):
            ok[r] = ok[r] and bool(good)
        return list(zip(ok, top[len(rows):].tolist()))


def _rope(config: dict) -> dict[str, float]:
    """RoPE bases as mlx-lm reads them, from the `rope_parameters` transformers 5 writes
    (one for all layers, or Gemma's per layer type), where the config lacks them."""
    params = config.get("rope_parameters") or {}
    out = {"rope_theta": params.get("rope_theta", params.get("full_attention", {}).get("rope_theta")),
           "rope_local_base_freq": params.get("sliding_attention", {}).get("rope_theta")}
    return {k: v for k, v in out.items() if v is not None and k not in config}


def load_mlx_model(spec: str | os.PathLike[str] | None = None, *, cache_dir: str | os.PathLike[str] | None = None,
                   progress: bool = True) -> MlxModel:
    """The model of `spec` (as `sleepwake.models.load_model` takes it) on MLX, in float32,
    from the safetensors directory the PyTorch backend loads (a GGUF file is converted
    into the cache first, as there)."""
    from transformers import AutoTokenizer

    source, path, fp = converted(spec, cache_dir=cache_dir, progress=progress)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") not in SUPPORTED:
        raise UnsupportedArchitectureError(f"model type {config.get('model_type')!r} is not supported on MLX yet; "
                                           f"supported: {', '.join(SUPPORTED)} (use the torch backend)")
    extra = _rope(config)
    try:
        model, _ = mlx_lm_load(path, model_config=extra)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001
        raise ModelNotFoundError(f"cannot load model from {path} into MLX: {exc}") from exc
    model.set_dtype(mx.float32)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return MlxModel(model, tokenizer, source.name, fp, Path(path).resolve())
