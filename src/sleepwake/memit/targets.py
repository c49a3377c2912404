"""v*: the hidden states that would make the model say the targets (paper eq. 1).

For every slot we optimise an additive δ on the residual stream at the last edited
layer so that all target tokens become likely, with a KL term on a neutral prompt
("{subject} is a") and ‖δ‖ clamped relative to ‖h‖. Adam scales its steps per
coordinate, which is why the paper's lr 0.5 works here although the residual norm
is ~160 (DESIGN.md).

Speed: a row of a step's batch packs the sequences of one δ (a subject's chat and raw
prompts and its KL prompt, each seeing only itself), so little compute goes to
padding (a short raw prompt padded to a long chat one had been half of a 5-fact
step); rows of very different lengths run as separate groups. The LM head
runs only where a loss is taken, once per step for all groups; the layers below the
edited one are replayed from a cache, and so is each sequence's fixed prefix (a KV
cache). On a CPU with fast bf16 matmuls most steps run them in bf16, and float32
steps finish; on a GPU one step is captured as a CUDA graph and replayed (launching
its kernels one by one from Python cost as much as the step itself on the 8B shape).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sleepwake.config import MemitConfig
from sleepwake.inference import CACHE, head_logits, pad_right
from sleepwake.memit.requests import EditRequest, slot_positions
from sleepwake.memit.trace import (
    add_to_residual,
    frozen_prefix,
    hidden_of,
    layer_output,
)
from sleepwake.models import Architecture, is_linear
from sleepwake.placement import input_device, module_device, offloaded, output_device, spread
from sleepwake.quantize import is_quantized


@dataclass
class Slots:
    """Flat index of edited positions in a right-padded batch of requests."""

    rows: torch.Tensor  # batch row of each slot
    cols: torch.Tensor  # position of each slot
    request: torch.Tensor  # request index of each slot
    fact: torch.Tensor  # fact index (within the batch) of each slot
    delta: torch.Tensor  # which δ (optimised vector) each slot receives


def make_slots(requests: Sequence[EditRequest], cfg: MemitConfig, device: torch.device) -> Slots:
    rows, cols, req, fact, delta = [], [], [], [], []
    shared: dict[str, int] = {}
    for r, q in enumerate(requests):
        for pos in slot_positions(q, cfg):
            rows.append(r)
            cols.append(pos)
            req.append(r)
            fact.append(q.fact_index)
            if cfg.key_positions == "subject":
                delta.append(shared.setdefault(q.subject, len(shared)))
            else:
                delta.append(len(delta))
    t = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)
    return Slots(t(rows), t(cols), t(req), t(fact), t(delta))


def hidden_at(model: nn.Module, inputs: dict[str, object], rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The last hidden states (before the LM head) at chosen positions."""
    hidden = model.get_decoder()(**inputs, use_cache=CACHE in inputs).last_hidden_state
    return hidden[rows.to(hidden.device), cols.to(hidden.device)]


def bf16_phase_applies(model: nn.Module, device: torch.device, cfg: MemitConfig) -> bool:
    """Whether v* takes most of its steps in bfloat16: a float32 model on a CPU with bf16
    support, where `cfg.bf16_targets` asks for it or (None) bf16 matmuls are faster here.
    (On a GPU the large models run in bf16 already, and a step is one CUDA graph.)"""
    if (cfg.bf16_targets is False or device.type != "cpu" or next(model.parameters()).dtype != torch.float32
            or not _cpu_bf16()):
        return False
    return cfg.bf16_targets or bf16_matmuls_faster(model.get_input_embeddings().embedding_dim,
                                                   torch.get_num_threads())


def _cpu_bf16() -> bool:
    """Whether oneDNN runs bfloat16 on this CPU. torch answers it only through a private
    op; a torch without it is taken as no (v* then runs in float32, as before)."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except (RuntimeError, AttributeError):
        return False


@functools.cache
def bf16_matmuls_faster(d_model: int, threads: int) -> bool:
    """Whether a v*-sized bf16 matmul takes ≤ 0.8× the time of the float32 one on this CPU,
    timed once per process and thread count (~0.1 s). The best of several alternating
    runs of each is compared, so that other work on the machine slows both alike. With
    AVX512-BF16 but no AMX, one machine of this project ran them at 0.6× float32 speed."""
    x = torch.randn(256, d_model)
    w = torch.randn(4 * d_model, d_model)
    pairs = {torch.float32: (x, w), torch.bfloat16: (x.bfloat16(), w.bfloat16())}
    best = dict.fromkeys(pairs, math.inf)
    for _ in range(6):
        for dtype, (a, b) in pairs.items():
            t = time.perf_counter()
            F.linear(a, b)
            best[dtype] = min(best[dtype], time.perf_counter() - t)
    return best[torch.bfloat16] <= 0.8 * best[torch.float32]


@contextlib.contextmanager
def bf16_above(model: nn.Module, arch: Architecture, layer: int) -> Iterator[None]:
    """The linear maps above `layer` and the LM head compute in bfloat16 until exit.

    Only the matmuls: each map's weight (and bias) is cast once here (autocast would cast a
    frozen weight again on every call, which cost as much as the bf16 matmuls saved)
    and its input and output are cast at the call. Attention, norms and the residual
    stream stay float32 (this CPU's bf16 attention backward was 8× slower than the
    float32 one). Backward passes must run inside too. The float32 weights are back
    on exit, also after an exception."""
    # A 4-bit map computes from its own packed weight (`sleepwake.quantize`): left as it is.
    # An offloaded map's weight is loaded for each pass (`placement.offloaded`): left float32 too.
    mods = [m for blk in arch.layers[layer + 1:] for m in blk.modules()
            if is_linear(m) and not is_quantized(m) and not offloaded(m)]
    mods.append(model.get_output_embeddings())
    # New parameters, not new data in the old ones: a tied LM head shares its weight
    # with the input embedding, which must stay float32.
    saved = [(m, name, p) for m in mods for name, p in m.named_parameters(recurse=False)]
    handles = []
    try:
        for m, name, p in saved:
            setattr(m, name, nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False))
        for m in mods:
            handles.append(m.register_forward_pre_hook(lambda _m, args: (args[0].to(torch.bfloat16), *args[1:])))
            handles.append(m.register_forward_hook(lambda _m, _a, out: out.float()))
        yield
    finally:
        for h in handles:
            h.remove()
        for m, name, p in saved:
            setattr(m, name, p)


MIN_PREFIX = 2
GPU_ONE_GROUP_TOKENS = 4096  # 8B shape: 5 facts (~750 padded tokens) one group, 50 facts (~7500) by length
CPU_ONE_GROUP_TOKENS = 256  # 5 facts (5 rows × ~20 re-run tokens) one group


def _fresh_copy(cache: object) -> object:
    """A copy of a KV cache that a forward pass may extend without touching the original.

    Cache layers extend by concatenation (a new tensor, the old one untouched), so
    copying the layer objects is enough; a deep copy of every tensor took 20% of the
    v* time on an H100."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        return copy.deepcopy(cache)
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in layers]
    return out


@dataclass
class _Group:
    """Rows of similar length run together; a row holds the requests and KL prompt of one δ.

    The tokens of a sequence before the earliest position any δ or read touches do not
    change during the optimisation (the chat template's system prompt, the question
    up to the subject): they are computed once into a KV cache and only the
    suffixes are re-run on each step; positions below are relative to the suffixes.
    Where the model takes explicit 4-D masks (see `_segment_inputs`), a row packs
    several sequences, each with a prefix of its own length; else a row is one
    sequence and every row's prefix has the same length.
    """

    batch: dict[str, torch.Tensor]  # the suffixes, right-padded; + mask and positions if packed (input device)
    prefix_ids: torch.Tensor | None  # the prefixes (rows × P), behind `prefix_cache`
    prefix_cache: object | None
    cached: object  # output of the edited layer without δ
    d_rows: torch.Tensor  # where to add δ (these four on the edited layer's device)
    d_cols: torch.Tensor
    d_src: torch.Tensor  # which δ row goes there
    d_slot: torch.Tensor  # which slot that place is, or -1 in a KL prompt
    o_rows: torch.Tensor  # where logits are read (these four on the LM head's device)
    o_cols: torch.Tensor
    o_tok: torch.Tensor  # target token, or -1 for a KL position
    o_req: torch.Tensor  # request index of each read
    tok_idx: torch.Tensor = field(init=False)  # reads of a target token ...
    kl_idx: torch.Tensor = field(init=False)  # ... and of a KL prompt, as indices (masks cost a GPU sync)

    def __post_init__(self) -> None:
        self.tok_idx = (self.o_tok >= 0).nonzero().squeeze(1)
        self.kl_idx = (self.o_tok < 0).nonzero().squeeze(1)

    def inputs(self) -> dict[str, object]:
        """Model inputs for one forward pass (a fresh copy of the prefix cache each time)."""
        if self.prefix_cache is None:
            return dict(self.batch)
        return {**self.batch, CACHE: _fresh_copy(self.prefix_cache)}

    def without(self, drop: torch.Tensor) -> _Group | None:
        """This group without the rows where `drop` (one bool per row) is set; None if none is left.

        Row indices on the host index tensors on any device (the prefix cache's layers may
        each be on another)."""
        drop = drop.cpu()
        keep = (~drop).nonzero().squeeze(1)
        if len(keep) == 0:
            return None
        new_row = torch.full_like(drop, -1, dtype=torch.long)
        new_row[keep] = torch.arange(len(keep))
        cache = None
        if self.prefix_cache is not None:
            cache = _fresh_copy(self.prefix_cache)
            cache.batch_select_indices(keep)
        cached = self.cached
        cached = (cached[0][keep], *cached[1:]) if isinstance(cached, tuple) else cached[keep]
        at, out = self.d_rows.device, self.o_rows.device
        d, o = ~drop.to(at)[self.d_rows], ~drop.to(out)[self.o_rows]
        return _Group(
            {k: v[keep] for k, v in self.batch.items()}, None if self.prefix_ids is None else self.prefix_ids[keep],
            cache, cached, new_row.to(at)[self.d_rows[d]], self.d_cols[d], self.d_src[d], self.d_slot[d],
            new_row.to(out)[self.o_rows[o]], self.o_cols[o], self.o_tok[o], self.o_req[o],
        )


def _groups(
    model: nn.Module, arch: Architecture, requests: Sequence[EditRequest], slots: Slots, subject_kl: bool,
    layer: int, pad: int, device: torch.device,
) -> list[_Group]:
    slot_list = list(zip(slots.rows.tolist(), slots.cols.tolist()))
    slot_delta = slots.delta.tolist()
    first_slot: dict[int, int] = {}
    for s, (r, _pos) in enumerate(slot_list):
        first_slot.setdefault(r, s)
    # One KL prompt per distinct (prompt, δ): requests about one subject share both.
    kl_first: dict[tuple, int] = {}
    for r, s in first_slot.items():
        kl_first.setdefault((requests[r].kl_ids, slot_delta[s]), r)
    kl_reqs = list(kl_first.values())
    # Sequences: each request's, then the KL prompts (sequence n + j is kl_reqs[j]'s).
    n = len(requests)
    # A request's last token is only ever a target, never read at: it is not fed.
    seqs = [q.ids[:-1] for q in requests] + [requests[r].kl_ids for r in kl_reqs]
    owner = list(range(n)) + kl_reqs  # the request whose first δ each sequence gets
    kl_pos = [q.kl_subject_pos if subject_kl else len(q.kl_ids) - 1 for q in requests]
    first_pos = {r: min(p for rr, p in slot_list if rr == r) for r in first_slot}
    # The first position of each sequence that any δ or read touches: what comes before is fixed.
    touch = [(min(requests[i].prompt_len - 1, first_pos[i]) if i < n else kl_pos[kl_reqs[i - n]])
             for i in range(len(seqs))]
    # A row packs the sequences of one δ (a subject's raw and chat prompts and its KL
    # prompt): little padding, and a δ whose every request is met leaves as one row
    # (`_retire`). That needs the 4-D masks of `_segment_inputs`; without them a row is
    # one sequence, run whole after a prefix common to its group.
    by_delta: dict[int, list[int]] = {}
    for i in range(len(seqs)):
        by_delta.setdefault(slot_delta[first_slot[owner[i]]], []).append(i)
    rows = list(by_delta.values())
    longest = lambda rows: max(sum(len(seqs[i]) for i in row) for row in rows)  # tokens of the longest row
    masked = _segment_masks_ok(model, longest(rows))
    if not masked:
        rows = [[i] for i in range(len(seqs))]

    def work(row: list[int]) -> int:
        """Tokens a step runs for the row (without padding)."""
        return sum(len(seqs[i]) - (touch[i] if masked else 0) for i in row)

    rows.sort(key=work)
    buckets: list[list[list[int]]] = []
    # A new bucket when padding would more than double the work. But every group costs
    # its own few thousand small ops (on a GPU, kernels and the time to build their CUDA
    # graph), which outweighs padding for a small batch: that runs as one group.
    if device.type == "cuda":
        one_group = len(rows) * longest(rows) <= GPU_ONE_GROUP_TOKENS
    else:
        one_group = len(rows) * work(rows[-1]) <= CPU_ONE_GROUP_TOKENS
    for row in rows:
        if buckets and (one_group or work(row) <= 2 * work(buckets[-1][0])):
            buckets[-1].append(row)
        else:
            buckets.append([row])
    out = []
    at, head = module_device(arch.layers[layer]), output_device(model)
    as_t = lambda xs, where: torch.tensor(xs, dtype=torch.long, device=where)
    for bucket in buckets:
        # The prefix before every δ and every read is fixed: compute it once.
        if masked:
            pre = {i: touch[i] for row in bucket for i in row}
        else:
            common = min(touch[row[0]] for row in bucket)
            pre = {row[0]: common if common >= MIN_PREFIX else 0 for row in bucket}
        # Without masks, rows are right-padded and attention is causal, so no
        # position that is read or edited ever sees a pad.
        batch = {"input_ids": pad_right([[t for i in row for t in seqs[i][pre[i]:]] for row in bucket], pad,
                                        device)["input_ids"]}
        prefix_cache = ids = None
        extra = _segment_inputs(model, [[(pre[i], len(seqs[i]) - pre[i]) for i in row] for row in bucket],
                                device) if masked else None
        if extra is not None:
            batch |= extra[1]
        if max(pre.values()):
            with torch.no_grad():
                ids = pad_right([[t for i in row for t in seqs[i][:pre[i]]] for row in bucket], pad,
                                device)["input_ids"]
                prefix_in = {"input_ids": ids} | (extra[0] if extra is not None else {})
                prefix_cache = getattr(model.get_decoder()(**prefix_in, use_cache=True), CACHE)
        dr, dc, ds, dsl, orow, ocol, otok, oreq = [], [], [], [], [], [], [], []
        for row_i, row in enumerate(bucket):
            offset = 0  # where the sequence's suffix starts in the row
            for i in row:
                shift = pre[i] - offset
                if i < n:
                    q = requests[i]
                    for s, (r, pos) in enumerate(slot_list):
                        if r == i:
                            dr.append(row_i), dc.append(pos - shift), ds.append(slot_delta[s]), dsl.append(s)
                    for pos in range(q.prompt_len - 1, len(q.ids) - 1):
                        orow.append(row_i), ocol.append(pos - shift), otok.append(q.ids[pos + 1]), oreq.append(i)
                else:  # KL prompt: gets the request's first δ (at the subject, or its last token)
                    r = kl_reqs[i - n]
                    dr.append(row_i), dc.append(kl_pos[r] - shift), ds.append(slot_delta[first_slot[r]])
                    dsl.append(-1)
                    orow.append(row_i), ocol.append(len(seqs[i]) - 1 - shift), otok.append(-1), oreq.append(r)
                offset += len(seqs[i]) - pre[i]
        group = _Group(batch, ids, prefix_cache, None, as_t(dr, at), as_t(dc, at), as_t(ds, at), as_t(dsl, at),
                       as_t(orow, head), as_t(ocol, head), as_t(otok, head), as_t(oreq, head))
        group.cached = layer_output(model, arch, group.inputs(), layer)
        out.append(group)
    return out


def _segment_masks_ok(model: nn.Module, length: int) -> bool:
    """Whether the model's attention takes the explicit 4-D masks of `_segment_inputs`
    for rows up to `length` tokens (not where a sliding window would have to cut them)."""
    impl = getattr(model.config, "_attn_implementation", None)
    window = getattr(model.config, "sliding_window", None)
    return impl in ("sdpa", "eager") and (window is None or window >= length)


def _segment_inputs(model: nn.Module, rows: Sequence[Sequence[tuple[int, int]]], device: torch.device
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Attention masks and positions for rows that each pack several sequences.

    `rows` gives, per row, the (prefix length, suffix length) of each of its sequences.
    The prefix pass runs the prefixes one after another (right-padded); the suffix pass
    runs the suffixes likewise, after that pass's KV cache. Each token sees only the
    earlier tokens of its own sequence, and its position is its place in that sequence
    (a short raw prompt packed after a long chat prompt must not read as position 60).
    Returns the extra inputs of the (prefix pass, suffix pass). The masks are 4-D, in
    the form the attention implementation adds or selects with, so the model uses them
    as they are (nothing is computed from them on the host: a CUDA graph can capture
    the step).
    """

    def layout(part: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence index and position of every token of the prefixes (0) or suffixes (1); pads: -1, 0."""
        seg, pos = [], []
        for row in rows:
            seg.append([s for s, lens in enumerate(row) for _ in range(lens[part])])
            pos.append([p for pre, suf in row for p in (range(pre) if part == 0 else range(pre, pre + suf))])
        width = max(map(len, seg))
        fill = lambda xs, v: torch.tensor([x + [v] * (width - len(x)) for x in xs], dtype=torch.long, device=device)
        return fill(seg, -1), fill(pos, 0)

    def allowed(q_seg: torch.Tensor, q_pos: torch.Tensor, k_seg: torch.Tensor, k_pos: torch.Tensor,
                first_own: int) -> torch.Tensor:
        ok = ((q_seg[:, :, None] == k_seg[:, None, :]) & (q_seg[:, :, None] >= 0)
              & (k_pos[:, None, :] <= q_pos[:, :, None]))
        # A pad sees itself only: some kernels give NaN for a query that sees nothing,
        # which would reach real tokens through the cache.
        q = torch.arange(q_seg.shape[1], device=device)
        ok[:, q, q + first_own] = True
        return ok[:, None]

    pre_seg, pre_pos = layout(0)
    suf_seg, suf_pos = layout(1)
    as_mask = lambda ok: ok
    if model.config._attn_implementation == "eager":
        dtype = next(model.parameters()).dtype
        as_mask = lambda ok: torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill(~ok, torch.finfo(dtype).min)
    prefix_pass = {"attention_mask": as_mask(allowed(pre_seg, pre_pos, pre_seg, pre_pos, 0)), "position_ids": pre_pos}
    suffix_pass = {
        "attention_mask": as_mask(allowed(suf_seg, suf_pos, torch.cat([pre_seg, suf_seg], 1),
                                          torch.cat([pre_pos, suf_pos], 1), pre_seg.shape[1])),
        "position_ids": suf_pos,
    }
    return prefix_pass, suffix_pass


def _retire(groups: list[_Group], base_logp: list[torch.Tensor | None], frozen: torch.Tensor
            ) -> tuple[list[_Group], list[torch.Tensor | None]]:
    """The groups without the rows whose every δ is frozen (and their KL baselines)."""
    out_g, out_b = [], []
    for g, base in zip(groups, base_logp):
        live = torch.zeros(len(g.batch["input_ids"]), dtype=torch.bool, device=g.d_rows.device)
        live[g.d_rows[~frozen.to(g.d_src.device)[g.d_src]]] = True
        smaller = g.without(~live)
        if smaller is not None:
            out_g.append(smaller)
            out_b.append(None if base is None else base[live.to(g.o_rows.device)[g.o_rows[g.kl_idx]]])
    return out_g, out_b


@contextlib.contextmanager
def _capturing(graph: torch.cuda.CUDAGraph, stream: torch.cuda.Stream) -> Iterator[None]:
    """`torch.cuda.graph` without the `empty_cache()` it runs first: that hands every
    cached block back to the driver, so each injection had to allocate its memory
    afresh, and on the 8B shape one injection in two took 2.6 s instead of 1.1 s."""
    with torch.cuda.stream(stream):
        graph.capture_begin()
        try:
            yield
        finally:
            graph.capture_end()


def release_cached(device: torch.device, share: float = 0.25) -> bool:
    """Hand the CUDA allocator's free cached blocks back to the driver once they pass
    `share` of the GPU's memory; whether it did. On one H200 a 1,000-fact lifelong run of
    the 135M model held 86 GB at 600 facts and 120 GB at 1,000, and three such runs on one
    GPU ran out of memory; the likely cause is that each v* graph has its own memory pool
    and the cache keeps what those pools freed (not yet re-measured with this release).
    Not after every graph: handing everything back each time made one 8B-shape injection
    in two take 2.6 s instead of 1.1 s."""
    if device.type != "cuda":
        return False
    idle = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if idle <= share * torch.cuda.get_device_properties(device).total_memory:
        return False
    torch.cuda.empty_cache()
    return True


class _StepGraph:
    """One v* step — forward, loss, backward into δ.grad — captured once as a CUDA graph
    and replayed. On a GPU, launching a step's few thousand small kernels from Python
    costs several times their work (8B shape: ~40 ms a step, eager)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, per_req: torch.Tensor) -> None:
        self.graph, self.per_req = graph, per_req

    @classmethod
    def capture(cls, forward: Callable[[], tuple[torch.Tensor, torch.Tensor]], delta: torch.Tensor
                ) -> tuple[_StepGraph | None, torch.Tensor]:
        """Capture the step; None (with a warning) where capture fails: then steps stay eager.

        Capture needs one pass first, on a side stream; that pass is the first step:
        its per-request losses are returned and δ.grad holds its gradient."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            delta.grad = None
            per_req, loss = forward()
            loss.backward()
        torch.cuda.current_stream().wait_stream(side)
        per_req, loss, grad = per_req.detach(), None, delta.grad
        delta.grad = None  # backward in the graph writes a fresh, static δ.grad
        try:
            graph = torch.cuda.CUDAGraph()
            with _capturing(graph, side):
                graph_per_req, graph_loss = forward()
                graph_loss.backward()
        except RuntimeError as exc:
            warnings.warn(f"v*: CUDA graph capture failed, stepping eagerly ({exc})", stacklevel=2)
            torch.cuda.synchronize()
            delta.grad = grad
            return None, per_req
        delta.grad.copy_(grad)  # capture ran nothing: the first step's gradient goes back in
        return cls(graph, graph_per_req), per_req

    def replay(self) -> torch.Tensor:
        """Run the step again (δ and δ.grad are the same tensors); per-request losses."""
        self.graph.replay()
        return self.per_req


@dataclass
class TargetResult:
    values: torch.Tensor  # (n_slots, d_model): v* = h + δ
    deltas: torch.Tensor  # (n_slots, d_model): δ
    loss_before: float
    loss_after: float
    steps: int


def step_budget(slots: Slots, cfg: MemitConfig) -> int:
    """The v* step cap: `cfg.v_steps` times half the most facts one δ carries (rounded up).

    One δ must then bring out 2 targets per fact (raw and chat): on 20 subjects × 3
    facts in batches of 15, 40 steps ended at mean losses 0.12 / 0.22 / 0.045 / 0.027
    (early stop 0.05) with raw recall 0.917, while 80 reached the early stop in every
    batch (63–100 steps) with raw 0.967 and chat 0.967 (BENCHMARKS.md). One person of 6
    facts needed 152 steps from δ = 0; a cap of 100 stopped at loss 2.8 and lost all 6.
    Batches whose δs carry one or two facts keep the cap."""
    facts_per_delta: dict[int, set[int]] = {}
    for d, f in zip(slots.delta.tolist(), slots.fact.tolist()):
        facts_per_delta.setdefault(d, set()).add(f)
    most = max((len(v) for v in facts_per_delta.values()), default=1)
    return cfg.v_steps * max(1, math.ceil(most / 2))


def _into_ball(delta: torch.Tensor, max_norm: torch.Tensor) -> None:
    """Scale each row of `delta` down, in place, to at most its `max_norm`."""
    norms = delta.norm(dim=-1, keepdim=True)
    delta.mul_(torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms)))


def compute_targets(
    model: nn.Module,
    arch: Architecture,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    slots: Slots,
    layer: int,
    cfg: MemitConfig,
    init: dict[str, torch.Tensor] | None = None,
) -> TargetResult:
    """v*: per δ (with subject keys, one per subject), the residual change at `layer` that
    makes the model give every target of its requests. `init` (subject keys only): a
    starting δ per subject, its δ of an earlier edit. A subject edited again with a new
    fact then starts where its other facts are already given, instead of from zero: on
    one subject of 6 facts (12 targets with chat) from zero took 152 steps."""
    device = input_device(model)
    # δ and h live where layer `layer` computes, the losses where the LM head does.
    at, out = module_device(arch.layers[layer]), output_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_req = len(requests)
    groups = _groups(model, arch, requests, slots, cfg.key_positions == "subject", layer, pad, device)

    # Unedited hidden states at the slots. The unedited KL distributions come from the
    # first step, which runs with δ = 0 (there the KL term and its gradient are zero).
    h = torch.zeros(len(slots.rows), arch.d_out(layer), device=at)
    base_logp: list[torch.Tensor | None] = [None] * len(groups)
    with torch.no_grad():
        for g in groups:
            own = g.d_slot >= 0  # a KL prompt borrows a slot's δ but not its h
            h[g.d_slot[own]] = hidden_of(g.cached)[g.d_rows[own], g.d_cols[own]].float()

    n_delta = int(slots.delta.max()) + 1
    delta = torch.zeros(n_delta, h.shape[1], device=at, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    # ‖δ‖ ≤ c · (mean ‖h‖ of the slots that share it)
    slot_delta = slots.delta.to(at)
    h_norm = torch.zeros(n_delta, device=at).index_add_(0, slot_delta, h.norm(dim=-1))
    uses = torch.zeros(n_delta, device=at).index_add_(0, slot_delta, torch.ones(len(h), device=at))
    ref_norm = (h_norm / uses)[:, None]
    max_norm = cfg.clamp_norm_factor * ref_norm
    counts = torch.zeros(n_req, device=out)
    for g in groups:
        counts.index_add_(0, g.o_req[g.tok_idx], torch.ones(len(g.tok_idx), device=out))
    counts.clamp_(min=1)
    n_kl = max(1, sum(len(g.kl_idx) for g in groups))

    def forward(groups: list[_Group], base_logp: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-request mean target NLL, and the loss, with δ as it is now. The
        groups' reads go through the LM head together (one pass over its weights)."""
        reads = []
        for g in groups:
            with frozen_prefix(arch, layer, g.cached), add_to_residual(arch, layer, g.d_rows, g.d_cols, delta[g.d_src]):
                reads.append(hidden_at(model, g.inputs(), g.o_rows, g.o_cols))
        logp_all = F.log_softmax(head_logits(model, torch.cat(reads)), dim=-1)
        per_req = torch.zeros(n_req, device=out)
        kl_total = torch.zeros((), device=out)
        for i, (g, logp) in enumerate(zip(groups, logp_all.split([len(r) for r in reads]))):
            t = g.tok_idx
            if len(t):
                nll = -logp[t].gather(1, g.o_tok[t][:, None]).squeeze(1)
                per_req = per_req.index_add(0, g.o_req[t], nll)
            if len(g.kl_idx):  # KL(new ‖ orig), summed over prompts
                kl_now = logp[g.kl_idx]
                if base_logp[i] is None:
                    base_logp[i] = kl_now.detach()
                kl_total = kl_total + F.kl_div(base_logp[i], kl_now, log_target=True, reduction="sum")
        per_req = per_req / counts
        size = (delta.norm(dim=-1, keepdim=True) / ref_norm).pow(2).mean()  # ‖δ‖² relative to ‖h‖²
        return per_req, per_req.mean() + cfg.kl_factor * kl_total / n_kl + cfg.v_weight_decay * size.to(out)

    # A δ whose prompts all reach the early-stop loss is done: it is frozen, and its
    # rows leave the batch, so the remaining steps only pay for the δs still learning
    # (δs do not interact: each has its own rows, KL prompt and Adam state). Under a
    # CUDA graph the rows stay (its shapes are fixed) and frozen δs are just kept.
    uses: list[set[int]] = [set() for _ in range(n_delta)]  # the requests each δ is read by
    for r, d in zip(slots.request.tolist(), slots.delta.tolist()):
        uses[d].add(r)
    last_loss = [float("nan")] * n_req  # bookkeeping on the CPU: one sync per step
    loss_before = float("nan")
    if init and cfg.key_positions == "subject":
        with torch.no_grad():
            forward(groups, base_logp)  # δ = 0: the KL baselines are the unedited model's
            for r, d in zip(slots.request.tolist(), slots.delta.tolist()):
                start = init.get(requests[r].subject)
                if start is not None:
                    delta[d] = start.to(at, torch.float32)
            _into_ball(delta, max_norm)  # ‖δ‖ ≤ c‖h‖ of this batch's h
    steps = 0
    use_graph = cfg.cuda_graphs and device.type == "cuda" and not spread(model)  # a graph runs on one GPU
    graph: _StepGraph | None = None

    def run(budget: int, groups: list[_Group], base_logp: list[torch.Tensor | None]) -> None:
        """Up to `budget` steps, until every δ reaches the early-stop loss; all δs start unfrozen."""
        nonlocal steps, loss_before, graph, use_graph
        frozen = [False] * n_delta
        for _ in range(budget):
            step, steps = steps, steps + 1
            loss = None
            if graph is not None:
                per_req = graph.replay()  # forward and backward
            elif use_graph and step == 0 and budget > 1:
                graph, per_req = _StepGraph.capture(lambda: forward(groups, base_logp), delta)  # + backward
                use_graph = graph is not None
            else:
                opt.zero_grad()
                per_req, loss = forward(groups, base_logp)
            now = per_req.tolist()
            for d in (d for d in range(n_delta) if not frozen[d]):
                for r in uses[d]:
                    last_loss[r] = now[r]
            if math.isnan(loss_before):  # the first step
                loss_before = sum(now) / n_req
            met = [x < cfg.early_stop_loss for x in last_loss]
            if all(met):
                return
            done = [d for d in range(n_delta) if not frozen[d] and all(met[r] for r in uses[d])]
            if loss is not None:
                loss.backward()
            still = [f or d in done for d, f in enumerate(frozen)]
            mask = torch.tensor(still, device=at) if any(still) else None  # the δs to keep as they are
            keep = delta.detach().clone() if mask is not None else None
            opt.step()
            with torch.no_grad():  # project back into the ball ‖δ‖ ≤ c‖h‖; frozen δs stay as they were
                _into_ball(delta, max_norm)
                if mask is not None:
                    delta.copy_(torch.where(mask[:, None], keep, delta))
            if done:
                for d in done:
                    frozen[d] = True
                if not use_graph:
                    groups, base_logp = _retire(groups, base_logp, mask)

    cap = step_budget(slots, cfg)
    if bf16_phase_applies(model, device, cfg) and cap > 1:
        # The bulk of the steps run in bf16 (~2× faster matmuls on such a CPU) until
        # every δ meets the early stop there; float32 steps then check every δ and
        # finish those that fall short, so the result meets the same criterion as an
        # all-float32 run. The KL baselines are float32 in both phases (bf16 ones
        # gave chat recall 0.6 instead of 1.0 on 10 facts, and +7.8% perplexity).
        with torch.no_grad():
            per_req, _ = forward(groups, base_logp)  # float32 baselines (set at δ = 0)
        last_loss[:] = per_req.tolist()
        loss_before = sum(last_loss) / n_req
        if not all(x < cfg.early_stop_loss for x in last_loss):
            with bf16_above(model, arch, layer):
                run(cap, groups, base_logp)
            run(max(1, cap // 4), groups, base_logp)
    else:
        run(cap, groups, base_logp)
    if graph is not None:
        del graph
        release_cached(at)
    deltas = delta.detach()[slot_delta]
    return TargetResult(h + deltas, deltas, loss_before, sum(last_loss) / n_req, steps)
