"""v*: the hidden states that would make the model say the targets (paper eq. 1).

For every slot we optimise an additive δ on the residual stream at the last edited
layer so that all target tokens become likely, with a KL term on a neutral prompt
("{subject} is a") and ‖δ‖ clamped relative to ‖h‖. Adam scales its steps per
coordinate, which is why the paper's lr 0.5 works here although the residual norm
is ~160 (DESIGN.md).

Speed: on a CPU, sequences are grouped by length (chat prompts are long, raw ones
short) so little compute goes to padding; on a GPU, where kernel launches cost more
than padded tokens, a small batch runs as one group. The LM head runs only where a loss is
taken, and the layers below the edited one are replayed from a cache.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sleepwake.config import MemitConfig
from sleepwake.inference import pad_right
from sleepwake.memit.requests import EditRequest, slot_positions
from sleepwake.memit.trace import (
    add_to_residual,
    frozen_prefix,
    hidden_of,
    layer_output,
)
from sleepwake.models import Architecture


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


def logits_at(model: nn.Module, inputs: dict[str, object], rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Next-token logits at chosen positions only: the LM head over every position
    of every sequence would cost more than the rest of the model on small models."""
    hidden = model.get_decoder()(**inputs, use_cache="past_key_values" in inputs).last_hidden_state
    logits = model.get_output_embeddings()(hidden[rows, cols]).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma 2/3
        logits = torch.tanh(logits / cap) * cap
    return logits


def fast_math(device: torch.device, cfg: MemitConfig) -> contextlib.AbstractContextManager:
    """bfloat16 autocast for the v* passes where the hardware has fast bf16 (CUDA, and
    CPUs with AVX512-BF16/AMX), when `cfg.bf16_targets` asks for it; the solve
    itself stays in float32/float64."""
    if not cfg.bf16_targets:
        return contextlib.nullcontext()
    if device.type == "cuda" or (device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


MIN_PREFIX = 2
GPU_ONE_GROUP_TOKENS = 4096  # 5 facts: ~750 padded tokens (one group); 50 facts: ~7500 (by length)


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
    """Sequences of similar length run together: requests and/or KL prompts.

    The first P tokens of every row, where P is the earliest position any δ or read
    touches, do not change during the optimisation (the chat template's system
    prompt, the question up to the subject): they are computed once into a KV cache
    and only the suffixes are re-run on each step; positions below are relative to
    the suffix.
    """

    batch: dict[str, torch.Tensor]  # the suffixes, right-padded (input ids only, see `_groups`)
    prefix_ids: torch.Tensor | None  # the prefixes (rows × P), behind `prefix_cache`
    prefix_cache: object | None
    cached: object  # output of the edited layer without δ
    d_rows: torch.Tensor  # where to add δ
    d_cols: torch.Tensor
    d_src: torch.Tensor  # which δ row goes there
    d_slot: torch.Tensor  # which slot that place is, or -1 in a KL prompt
    o_rows: torch.Tensor  # where logits are read
    o_cols: torch.Tensor
    o_tok: torch.Tensor  # target token, or -1 for a KL position
    o_req: torch.Tensor  # request index of each read

    def inputs(self) -> dict[str, object]:
        """Model inputs for one forward pass (a fresh copy of the prefix cache each time)."""
        if self.prefix_cache is None:
            return dict(self.batch)
        return {**self.batch, "past_key_values": _fresh_copy(self.prefix_cache)}

    def without(self, drop: torch.Tensor) -> _Group | None:
        """This group without the rows where `drop` (one bool per row) is set; None if none is left."""
        keep = (~drop).nonzero().squeeze(1)
        if len(keep) == 0:
            return None
        new_row = torch.full_like(drop, -1, dtype=torch.long)
        new_row[keep] = torch.arange(len(keep), device=keep.device)
        cache = None
        if self.prefix_cache is not None:
            cache = _fresh_copy(self.prefix_cache)
            cache.batch_select_indices(keep)
        cached = self.cached
        cached = (cached[0][keep], *cached[1:]) if isinstance(cached, tuple) else cached[keep]
        d, o = ~drop[self.d_rows], ~drop[self.o_rows]
        return _Group(
            {k: v[keep] for k, v in self.batch.items()}, None if self.prefix_ids is None else self.prefix_ids[keep],
            cache, cached, new_row[self.d_rows[d]], self.d_cols[d], self.d_src[d], self.d_slot[d],
            new_row[self.o_rows[o]], self.o_cols[o], self.o_tok[o], self.o_req[o],
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
    # Rows: each request's sequence, then the KL prompts (row n + j is kl_reqs[j]'s).
    n = len(requests)
    seqs = [q.ids for q in requests] + [requests[r].kl_ids for r in kl_reqs]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    buckets: list[list[int]] = []
    # A GPU pays per kernel launch more than per padded token, up to a point.
    one_group = device.type == "cuda" and len(seqs) * max(map(len, seqs)) <= GPU_ONE_GROUP_TOKENS
    for i in order:  # a new bucket when padding would more than double the work
        if buckets and (one_group or len(seqs[i]) <= 2 * len(seqs[buckets[-1][0]])):
            buckets[-1].append(i)
        else:
            buckets.append([i])
    kl_pos = [q.kl_subject_pos if subject_kl else len(q.kl_ids) - 1 for q in requests]
    first_pos = {r: min(p for rr, p in slot_list if rr == r) for r in first_slot}
    out = []
    as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)
    for bucket in buckets:
        # The prefix before every δ and every read is fixed: compute it once.
        first_touch = [
            (min(requests[i].prompt_len - 1, first_pos[i]) if i < n else kl_pos[kl_reqs[i - n]]) for i in bucket
        ]
        shared = min(first_touch)
        shared = shared if shared >= MIN_PREFIX else 0
        # No attention mask: rows are right-padded and attention is causal, so no position
        # that is read or edited ever sees a pad; a mask would only cost time.
        batch = {"input_ids": pad_right([seqs[i][shared:] for i in bucket], pad, device)["input_ids"]}
        prefix_cache = ids = None
        if shared:
            with torch.no_grad():
                ids = torch.tensor([list(seqs[i][:shared]) for i in bucket], device=device)
                prefix_cache = model(input_ids=ids, use_cache=True).past_key_values
        dr, dc, ds, dsl, orow, ocol, otok, oreq = [], [], [], [], [], [], [], []
        for row, i in enumerate(bucket):
            if i < n:
                q = requests[i]
                for s, (r, pos) in enumerate(slot_list):
                    if r == i:
                        dr.append(row), dc.append(pos - shared), ds.append(slot_delta[s]), dsl.append(s)
                for pos in range(q.prompt_len - 1, len(q.ids) - 1):
                    orow.append(row), ocol.append(pos - shared), otok.append(q.ids[pos + 1]), oreq.append(i)
            else:  # KL prompt: gets the request's first δ (at the subject, or its last token)
                r = kl_reqs[i - n]
                last = len(requests[r].kl_ids) - 1 - shared
                dr.append(row), dc.append(kl_pos[r] - shared), ds.append(slot_delta[first_slot[r]]), dsl.append(-1)
                orow.append(row), ocol.append(last), otok.append(-1), oreq.append(r)
        group = _Group(batch, ids, prefix_cache, None, as_t(dr), as_t(dc), as_t(ds), as_t(dsl),
                       as_t(orow), as_t(ocol), as_t(otok), as_t(oreq))
        group.cached = layer_output(model, arch, group.inputs(), layer)
        out.append(group)
    return out


def _retire(groups: list[_Group], base_logp: list[torch.Tensor], frozen: torch.Tensor
            ) -> tuple[list[_Group], list[torch.Tensor]]:
    """The groups without the rows whose every δ is frozen (and their KL baselines)."""
    out_g, out_b = [], []
    for g, base in zip(groups, base_logp):
        live = torch.zeros(len(g.batch["input_ids"]), dtype=torch.bool, device=frozen.device)
        live[g.d_rows[~frozen[g.d_src]]] = True
        smaller = g.without(~live)
        if smaller is not None:
            out_g.append(smaller)
            out_b.append(base[live[g.o_rows[g.o_tok < 0]]])
    return out_g, out_b


@dataclass
class TargetResult:
    values: torch.Tensor  # (n_slots, d_model): v* = h + δ
    loss_before: float
    loss_after: float
    steps: int


def compute_targets(
    model: nn.Module,
    arch: Architecture,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    slots: Slots,
    layer: int,
    cfg: MemitConfig,
) -> TargetResult:
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_req = len(requests)
    groups = _groups(model, arch, requests, slots, cfg.key_positions == "subject", layer, pad, device)

    # Unedited hidden states at the slots, and the unedited KL distributions.
    h = torch.zeros(len(slots.rows), arch.d_out(layer), device=device)
    base_logp: list[torch.Tensor] = []
    with torch.no_grad():
        for g in groups:
            own = g.d_slot >= 0  # a KL prompt borrows a slot's δ but not its h
            h[g.d_slot[own]] = hidden_of(g.cached)[g.d_rows[own], g.d_cols[own]].float()
            kl = g.o_tok < 0
            logits = torch.empty(0, 1, device=device)
            if kl.any():
                with frozen_prefix(arch, layer, g.cached), fast_math(device, cfg):
                    logits = logits_at(model, g.inputs(), g.o_rows[kl], g.o_cols[kl])
            base_logp.append(F.log_softmax(logits, dim=-1))

    n_delta = int(slots.delta.max()) + 1
    delta = torch.zeros(n_delta, h.shape[1], device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    # ‖δ‖ ≤ c · (mean ‖h‖ of the slots that share it)
    h_norm = torch.zeros(n_delta, device=device).index_add_(0, slots.delta, h.norm(dim=-1))
    uses = torch.zeros(n_delta, device=device).index_add_(0, slots.delta, torch.ones(len(h), device=device))
    ref_norm = (h_norm / uses)[:, None]
    max_norm = cfg.clamp_norm_factor * ref_norm
    counts = torch.zeros(n_req, device=device)
    for g in groups:
        tok = g.o_tok >= 0
        counts.index_add_(0, g.o_req[tok], torch.ones(int(tok.sum()), device=device))
    counts.clamp_(min=1)
    n_kl = max(1, sum(int((g.o_tok < 0).sum()) for g in groups))

    # A δ whose prompts all reach the early-stop loss is done: it is frozen, and its
    # rows leave the batch, so the remaining steps only pay for the δs still learning
    # (δs do not interact: each has its own rows, KL prompt and Adam state).
    uses: list[set[int]] = [set() for _ in range(n_delta)]  # the requests each δ is read by
    for r, d in zip(slots.request.tolist(), slots.delta.tolist()):
        uses[d].add(r)
    frozen = [False] * n_delta
    last_loss = [float("nan")] * n_req  # bookkeeping on the CPU: one sync per step
    loss_before = float("nan")
    steps = 0
    for step in range(cfg.v_steps):
        steps = step + 1
        opt.zero_grad()
        per_req = torch.zeros(n_req, device=device)
        kl_total = torch.zeros((), device=device)
        for g, base in zip(groups, base_logp):
            with (frozen_prefix(arch, layer, g.cached), fast_math(device, cfg),
                  add_to_residual(arch, layer, g.d_rows, g.d_cols, delta[g.d_src])):
                logits = logits_at(model, g.inputs(), g.o_rows, g.o_cols)
            logp = F.log_softmax(logits, dim=-1)
            tok = g.o_tok >= 0
            if tok.any():
                nll = -logp[tok].gather(1, g.o_tok[tok][:, None]).squeeze(1)
                per_req = per_req.index_add(0, g.o_req[tok], nll)
            if (~tok).any():  # KL(new ‖ orig), summed over prompts
                kl_total = kl_total + F.kl_div(base, logp[~tok], log_target=True, reduction="sum")
        per_req = per_req / counts
        now = per_req.tolist()
        for d in (d for d in range(n_delta) if not frozen[d]):
            for r in uses[d]:
                last_loss[r] = now[r]
        if step == 0:
            loss_before = sum(now) / n_req
        met = [x < cfg.early_stop_loss for x in last_loss]
        if all(met):
            break
        done = [d for d in range(n_delta) if not frozen[d] and all(met[r] for r in uses[d])]
        size = (delta.norm(dim=-1, keepdim=True) / ref_norm).pow(2).mean()  # ‖δ‖² relative to ‖h‖²
        loss = per_req.mean() + cfg.kl_factor * kl_total / n_kl + cfg.v_weight_decay * size
        loss.backward()
        still = [f or d in done for d, f in enumerate(frozen)]
        mask = torch.tensor(still, device=device) if any(still) else None  # masks cost a sync: only if needed
        keep = delta.detach()[mask].clone() if mask is not None else None
        opt.step()
        with torch.no_grad():  # project back into the ball ‖δ‖ ≤ c‖h‖; frozen δs stay as they were
            norms = delta.norm(dim=-1, keepdim=True)
            delta.mul_(torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms)))
            if mask is not None:
                delta[mask] = keep
        if done:
            for d in done:
                frozen[d] = True
            groups, base_logp = _retire(groups, base_logp, mask)
    return TargetResult(h + delta.detach()[slots.delta], loss_before, sum(last_loss) / n_req, steps)
