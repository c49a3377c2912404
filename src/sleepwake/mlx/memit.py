"""MEMIT on MLX: Ĉ, v* and the layer-by-layer spread run on the MLX model; the closed-form
solve is the PyTorch backend's own (`memit.solve`, float64), with arrays converted at the
boundary, so both backends solve eq. 3–5 with the same code and store the same factors.

v* follows `memit.targets` (Adam on one δ per subject after the last edited layer, every
target token of the raw prompt and the chat question, KL on "{subject} is a", ‖δ‖ ≤ c‖h‖,
early stop, the same step budget) without its speed-ups: no KV prefix cache, no bf16 phase,
no packed rows; the layers below the edited one run once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import torch
from mlx_lm.models.cache import KVCache

from sleepwake.config import MemitConfig
from sleepwake.facts import Fact
from sleepwake.memit.covariance import cached
from sleepwake.memit.editor import FactEdit, InjectStats, ReadKeys
from sleepwake.memit.requests import EditRequest, build_requests
from sleepwake.memit.solve import inverse_covariance, solve_update, through_post_norm
from sleepwake.memit.targets import make_slots, step_budget
from sleepwake.mlx.model import MlxModel

MIN_PREFIX = 16
"""Rows whose first δ or read comes this many tokens in, or later, and that share that
many first tokens, run from one KV cache of their common prefix (`_make_groups`)."""


def to_torch(x: mx.array) -> torch.Tensor:
    return torch.from_numpy(np.array(x, dtype=np.float32))


def to_mx(t: torch.Tensor) -> mx.array:
    return mx.array(t.detach().cpu().float().numpy())


def _pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[mx.array, np.ndarray]:
    """Right-padded ids, and the real length of each row."""
    n = max(len(s) for s in seqs)
    ids = np.full((len(seqs), n), pad, dtype=np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    return mx.array(ids), np.array([len(s) for s in seqs])


def covariances(mm: MlxModel, layers: Sequence[int], cfg: MemitConfig, cache_dir: Path,
                batch_size: int = 16) -> dict[int, torch.Tensor]:
    """Ĉ per layer (`memit.covariance`), from the cache the PyTorch backend shares, or
    computed on the MLX model over the same texts."""
    tok = mm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def compute(missing: list[int], texts: list[str]) -> tuple[dict[int, torch.Tensor], int]:
        enc = sorted((list(tok(t, add_special_tokens=True)["input_ids"])[: cfg.cov_max_tokens] for t in texts), key=len)
        sums = {l: mx.zeros((mm.down(l).weight.shape[1],) * 2) for l in missing}
        count = 0
        for start in range(0, len(enc), batch_size):
            ids, lengths = _pad(enc[start:start + batch_size], pad)
            seen, _ = mm.capture(ids, missing)
            mask = mx.array((np.arange(ids.shape[1])[None] < lengths[:, None]).astype(np.float32))[..., None]
            for l in missing:
                k = (seen[l][0] * mask).reshape(-1, seen[l][0].shape[-1])
                sums[l] = sums[l] + k.T @ k
            mx.eval(sums)
            count += int(lengths.sum())
        return {l: to_torch(s / count) for l, s in sums.items()}, count

    return cached(tok, layers, fingerprint=mm.fingerprint, cache_dir=cache_dir, n_texts=cfg.cov_texts,
                  max_tokens=cfg.cov_max_tokens, compute=compute)


def _fresh(prefix: Sequence[tuple[mx.array, mx.array]]) -> list[KVCache]:
    """KV caches holding `prefix` that a pass extends without changing it (a full cache
    grows by concatenation: new arrays)."""
    out = []
    for k, v in prefix:
        c = KVCache()
        c.keys, c.values, c.offset = k, v, k.shape[2]
        out.append(c)
    return out


@dataclass
class _Group:
    """Rows that run together: their common prefix is computed once into KV caches (the
    chat template's system turn), and only the suffixes run on each step."""

    rows: list[int]
    p: int  # the prefix's length
    prefix: list[tuple[mx.array, mx.array]] | None  # per layer above the edited one
    below: mx.array  # the suffixes' output of the edited layer, without δ
    place: mx.array  # rows × suffix × n_delta: where each δ is added
    reads: list[int]  # indices into the step's reads
    read_rows: mx.array
    read_cols: mx.array


def _make_groups(mm: MlxModel, seqs: list[tuple[int, ...]], places: list[list[tuple[int, int]]],
                 reads: list[tuple[int, int]], last: int, n_delta: int, pad: int) -> list[_Group]:
    """Rows that share a long fixed prefix (chat questions after one system turn) run
    together from its KV cache; the others together from the start. Grouping by the
    prefix itself, not by where the first δ lands, keeps a raw prompt with a long
    subject from joining the chat rows and leaving them no common prefix."""
    touch = [min([c for c, _ in places[i]] + [c for r, c in reads if r == i]) for i in range(len(seqs))]
    kinds: dict[tuple[int, ...], list[int]] = {}
    for i in range(len(seqs)):
        kinds.setdefault(tuple(seqs[i][:MIN_PREFIX]) if touch[i] >= MIN_PREFIX else (), []).append(i)
    rest = kinds.pop((), [])
    out = []
    for rows in [*kinds.values(), rest]:
        if not rows:
            continue
        p = min(touch[i] for i in rows)
        first = seqs[rows[0]]
        p = next((j for j in range(p) if any(seqs[i][j] != first[j] for i in rows)), p)
        if rows is not rest and p < MIN_PREFIX:  # nothing worth caching: run with the rest
            rest.extend(rows)
            continue
        prefix, caches_below = None, None
        if p >= 2:
            caches = [KVCache() for _ in range(mm.n_layers)]
            mm.blocks(mm.embed(mx.array([list(first[:p])])), 0, mm.n_layers, caches)
            kv = [(mx.repeat(c.keys[..., :p, :], len(rows), 0), mx.repeat(c.values[..., :p, :], len(rows), 0))
                  for c in caches]
            mx.eval(kv)
            prefix, caches_below = kv[last + 1:], _fresh(kv[: last + 1])
        else:
            p = 0
        ids, _ = _pad([seqs[i][p:] for i in rows], pad)
        below = mm.blocks(mm.embed(ids), 0, last + 1, caches_below)
        place = np.zeros((len(rows), ids.shape[1], n_delta), dtype=np.float32)
        for j, i in enumerate(rows):
            for c, d in places[i]:
                place[j, c - p, d] = 1.0
        mine = [k for k, (r, _) in enumerate(reads) if r in rows]
        at = {i: j for j, i in enumerate(rows)}
        mx.eval(below)
        out.append(_Group(rows, p, prefix, below, mx.array(place), mine, mx.array([at[reads[k][0]] for k in mine]),
                          mx.array([reads[k][1] - p for k in mine])))
    return out


def _targets(mm: MlxModel, requests: Sequence[EditRequest], slot_delta: list[int], slot_rows: list[int],
             slot_cols: list[int], last: int, cfg: MemitConfig, budget: int,
             init: dict[str, torch.Tensor] | None = None) -> tuple[np.ndarray, np.ndarray, float, float, int]:
    """v* (eq. 1): per slot the target hidden state h + δ and δ at layer `last`, the mean
    loss before and after, and the steps taken. `init` (subject keys only): a starting δ
    per subject, as `memit.targets.compute_targets` takes it."""
    tok = mm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    n_req, n_delta = len(requests), max(slot_delta) + 1
    first_slot: dict[int, int] = {}
    for s, r in enumerate(slot_rows):
        first_slot.setdefault(r, s)
    kl_of: dict[tuple, int] = {}  # one KL prompt per (prompt, δ)
    for r, s in first_slot.items():
        kl_of.setdefault((requests[r].kl_ids, slot_delta[s]), r)
    kl_reqs = list(kl_of.values())
    seqs = [q.ids[:-1] for q in requests] + [requests[r].kl_ids for r in kl_reqs]
    places: list[list[tuple[int, int]]] = [[] for _ in seqs]
    for s, (r, c) in enumerate(zip(slot_rows, slot_cols)):
        places[r].append((c, slot_delta[s]))
    for j, r in enumerate(kl_reqs):
        places[n_req + j].append((requests[r].kl_subject_pos, slot_delta[first_slot[r]]))
    reads, toks, owner = [], [], []
    for i, q in enumerate(requests):
        for pos in range(q.prompt_len - 1, len(q.ids) - 1):
            reads.append((i, pos)), toks.append(q.ids[pos + 1]), owner.append(i)
    n_tok = len(reads)
    reads += [(n_req + j, len(requests[r].kl_ids) - 1) for j, r in enumerate(kl_reqs)]
    per_req_of = np.zeros((n_req, n_tok), dtype=np.float32)
    per_req_of[owner, np.arange(n_tok)] = 1.0
    per_req_of /= np.maximum(per_req_of.sum(1, keepdims=True), 1.0)
    toks_a, per_req_a = mx.array(toks), mx.array(per_req_of)

    groups = _make_groups(mm, seqs, places, reads, last, n_delta, pad)
    order = mx.array(np.argsort(np.concatenate([g.reads for g in groups])))  # back to the order of `reads`
    h = np.zeros((len(slot_rows), mm.down(last).weight.shape[0]), dtype=np.float32)  # unedited, at the slots
    for g in groups:
        below = np.array(g.below)
        for s, (r, c) in enumerate(zip(slot_rows, slot_cols)):
            if r in g.rows:
                h[s] = below[g.rows.index(r), c - g.p]
    h_norm = np.linalg.norm(h, axis=-1)
    ref = np.zeros(n_delta, dtype=np.float32)
    np.add.at(ref, slot_delta, h_norm)
    ref /= np.maximum(np.bincount(slot_delta, minlength=n_delta), 1)
    max_norm = mx.array(cfg.clamp_norm_factor * ref)[:, None]

    def read(delta: mx.array) -> mx.array:
        parts = []
        for g in groups:
            caches = _fresh(g.prefix) if g.prefix is not None else None
            out = mm.blocks(g.below + g.place @ delta, last + 1, mm.n_layers, caches)
            parts.append(out[g.read_rows, g.read_cols])
        logits = mm.logits(mx.concatenate(parts)[order])
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    base_kl = mx.stop_gradient(read(mx.zeros((n_delta, h.shape[1])))[n_tok:])
    n_kl = max(1, len(kl_reqs))

    def loss_fn(delta: mx.array) -> tuple[mx.array, mx.array]:
        logp = read(delta)
        nll = -mx.take_along_axis(logp[:n_tok], toks_a[:, None], axis=1)[:, 0]
        per_req = per_req_a @ nll
        now = logp[n_tok:]
        kl = mx.sum(mx.exp(now) * (now - base_kl))
        return mx.mean(per_req) + cfg.kl_factor * kl / n_kl, per_req

    step = mx.value_and_grad(loss_fn)
    opt = optim.Adam(learning_rate=cfg.v_lr, bias_correction=True)
    start = np.zeros((n_delta, h.shape[1]), dtype=np.float32)
    if init and cfg.key_positions == "subject":
        for r, d in zip(slot_rows, slot_delta):
            if requests[r].subject in init:
                start[d] = init[requests[r].subject].float().numpy()
    norms = mx.linalg.norm(mx.array(start), axis=-1, keepdims=True)  # into the ball ‖δ‖ ≤ c‖h‖
    params = {"delta": mx.array(start) * mx.where(norms > max_norm, max_norm / mx.maximum(norms, 1e-12), 1.0)}
    uses = [sorted({r for r, d in zip(slot_rows, slot_delta) if d == k}) for k in range(n_delta)]
    frozen = np.zeros(n_delta, dtype=bool)
    loss_before = loss_after = float("nan")
    steps = 0
    for steps in range(1, budget + 1):
        (_, per_req), grad = step(params["delta"])
        now = np.array(per_req)
        if steps == 1:
            loss_before = float(now.mean())
        loss_after = float(now.mean())
        if (now < cfg.early_stop_loss).all():
            break
        frozen |= np.array([all(now[r] < cfg.early_stop_loss for r in u) for u in uses])
        keep = params["delta"]
        opt.update(params, {"delta": grad})
        d = params["delta"]
        norms = mx.linalg.norm(d, axis=-1, keepdims=True)
        d = d * mx.where(norms > max_norm, max_norm / norms, 1.0)
        params["delta"] = mx.where(mx.array(frozen)[:, None], keep, d)
        mx.eval(params, opt.state)
    deltas = np.array(params["delta"])[slot_delta]
    return h + deltas, deltas, loss_before, loss_after, steps


class MlxEditor:
    """MEMIT edits of batches of facts on an `MlxModel` (`memit.editor.MemitEditor`'s method)."""

    def __init__(self, mm: MlxModel, layers: Sequence[int], covs: dict[int, torch.Tensor] | None, cfg: MemitConfig,
                 cov_inv: dict[int, torch.Tensor] | None = None) -> None:
        """`covs`: Ĉ per layer, or None with `cov_inv`, their inverses computed before."""
        self.mm, self.layers, self.cfg = mm, tuple(sorted(layers)), cfg
        self.cov_inv = cov_inv if cov_inv is not None else {l: inverse_covariance(covs[l]) for l in self.layers}

    def edit(self, facts: Sequence[Fact], previous: Sequence[FactEdit], add: Callable[[int, torch.Tensor], None],
             *, chat: bool, init: dict[str, torch.Tensor] | None = None) -> tuple[list[FactEdit], InjectStats]:
        """One FactEdit per fact; each layer's update goes into the model through `add(layer,
        ΔW)` before the next layer is solved. `previous`: the active edits (eq. 5); `init`:
        where v* starts per subject (`_targets`)."""
        cfg = replace(self.cfg, chat_edit=chat)
        t0 = time.perf_counter()
        mm, last = self.mm, self.layers[-1]
        requests = build_requests(facts, mm.tokenizer, cfg)
        slots = make_slots(requests, cfg, torch.device("cpu"))
        s_rows, s_cols, s_delta = slots.rows.tolist(), slots.cols.tolist(), slots.delta.tolist()
        values, deltas, before, after, steps = _targets(mm, requests, s_delta, s_rows, s_cols, last, cfg,
                                                        step_budget(slots, cfg), init)
        v_seconds = time.perf_counter() - t0
        last_slot = [0] * len(requests)
        for r, c in zip(s_rows, s_cols):
            last_slot[r] = max(last_slot[r], c)
        pad = mm.tokenizer.pad_token_id if mm.tokenizer.pad_token_id is not None else 0
        ids, _ = _pad([q.ids[: last_slot[r] + 1] for r, q in enumerate(requests)], pad)
        rows, cols = mx.array(s_rows), mx.array(s_cols)
        slot_fact = slots.fact.tolist()
        per_fact = [[s for s, f in enumerate(slot_fact) if f == i] for i in range(len(facts))]
        edits = [FactEdit() for _ in facts]
        if cfg.chat_edit and cfg.key_positions == "subject":
            for e, idx in zip(edits, per_fact):
                e.v[last] = torch.from_numpy(deltas[idx[0]].copy())
        target = torch.from_numpy(values)
        for i, layer in enumerate(self.layers):
            seen, hid = mm.capture(ids, [layer], hidden=last)
            k = to_torch(seen[layer][0][rows, cols])
            resid = (target - to_torch(hid[rows, cols])) / (len(self.layers) - i)
            post = mm.post_norm(layer)
            if post is not None:  # the residual change this layer owes, as a down-projection change
                resid = through_post_norm(post, to_torch(seen[layer][1][rows, cols]), resid)
            prev = None
            if cfg.constrain_previous and previous:
                prev = torch.cat([e.k[layer] for e in previous if layer in e.k])
            a, b = solve_update(resid, k, self.cov_inv[layer], cfg.lambda_reg, prev)
            for f, idx in enumerate(per_fact):
                edits[f].a[layer], edits[f].b[layer], edits[f].k[layer] = a[:, idx], b[idx], k[idx]
            add(layer, a @ b)
        stats = InjectStats(time.perf_counter() - t0, v_seconds, before, after, steps, len(slot_fact), chat=chat)
        return edits, stats

    def subject_deltas(self, facts: Sequence[Fact], clamp_norm_factor: float | None = None,
                       init: dict[str, torch.Tensor] | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, ReadKeys]]:
        """v* for `facts` on the live model, raw prompts and chat questions both, without
        writing anything: per subject, δ at the last edited layer and the keys it is read
        at (`memit.editor.MemitEditor.subject_deltas`, what a keyed sleep solves)."""
        cfg = replace(self.cfg, chat_edit=True, key_positions="subject",
                      clamp_norm_factor=clamp_norm_factor or self.cfg.clamp_norm_factor)
        requests = build_requests(facts, self.mm.tokenizer, cfg)
        slots = make_slots(requests, cfg, torch.device("cpu"))
        s_rows, s_delta = slots.rows.tolist(), slots.delta.tolist()
        _, deltas, _, _, _ = _targets(self.mm, requests, s_delta, s_rows, slots.cols.tolist(), self.layers[-1], cfg,
                                      step_budget(slots, cfg), init)
        out: dict[str, torch.Tensor] = {}
        for s, r in enumerate(slots.request.tolist()):
            out.setdefault(requests[r].subject, torch.from_numpy(deltas[s].copy()))
        return out, self.subject_keys(facts)

    def subject_keys(self, facts: Sequence[Fact]) -> dict[str, ReadKeys]:
        """Where the live model reads each subject of `facts` (raw prompt and chat question),
        at the first edited layer: what a keyed entry is matched against (`sleepwake.keyed`)."""
        cfg = replace(self.cfg, chat_edit=True, key_positions="subject")
        requests = build_requests(facts, self.mm.tokenizer, cfg)
        layer = self.layers[0]
        pad = self.mm.tokenizer.pad_token_id if self.mm.tokenizer.pad_token_id is not None else 0
        ids, _ = _pad([q.ids[: q.subject_pos + 1] for q in requests], pad)
        seen, _ = self.mm.capture(ids, [layer])
        x = np.array(seen[layer][0])
        out: dict[str, list[int]] = {}
        for i, q in enumerate(requests):
            out.setdefault(q.subject, []).append(i)
        keys = torch.from_numpy(x[np.arange(len(requests)), [q.subject_pos for q in requests]].copy())
        has = torch.tensor([q.head_pos is not None for q in requests], dtype=torch.float32)[:, None]
        heads = torch.from_numpy(x[np.arange(len(requests)), [q.subject_pos if q.head_pos is None else q.head_pos
                                                              for q in requests]].copy()) * has
        backs = torch.tensor([0 if q.head_pos is None else q.subject_pos - q.head_pos for q in requests])
        return {s: ReadKeys(keys[ix], heads[ix], backs[ix]) for s, ix in out.items()}
