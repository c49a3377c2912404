"""MEMIT for a batch of facts: v*, then a layer-by-layer spread of the residual.

Each fact's edit is stored as factors ``A_f @ B_f`` per edited layer; the live
weights (`sleepwake.weights.LiveWeights`) are rebuilt from them after every batch.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from sleepwake.config import MemitConfig
from sleepwake.facts import Fact
from sleepwake.inference import attention_kernels, pad_right, rows_per_pass, shared_prefix
from sleepwake.memit.requests import build_requests
from sleepwake.memit.solve import inverse_covariance, solve_update, through_post_norm
from sleepwake.memit.targets import compute_targets, make_slots
from sleepwake.memit.trace import frozen_prefix, run_capture
from sleepwake.models import Architecture
from sleepwake.placement import Where, input_device, place
from sleepwake.weights import Factor, LiveWeights


@dataclass(frozen=True)
class ReadKeys:
    """Where prompts read a subject, at one layer's down-projection input: the key at the
    subject's last token, the key at the last token of its words but the last ("Anna" of
    "Anna Berg"; zeros for a one-word subject) and how many tokens back that is (0: none)."""

    keys: torch.Tensor  # n × d_in
    heads: torch.Tensor  # n × d_in
    backs: torch.Tensor  # n, long

    def __getitem__(self, rows: Any) -> "ReadKeys":
        return ReadKeys(self.keys[rows], self.heads[rows], self.backs[rows])


def _by_subject(requests: Sequence[Any], keys: ReadKeys) -> dict[str, ReadKeys]:
    rows: dict[str, list[int]] = {}
    for i, q in enumerate(requests):
        rows.setdefault(q.subject, []).append(i)
    return {subj: keys[torch.tensor(ix)] for subj, ix in rows.items()}


@dataclass
class FactEdit:
    """One fact's share of a MEMIT update, per edited layer.

    A: d_out × n, B: n × d_in (ΔW = A @ B), K: n × d_in, the keys it was written at,
    which later edits keep fixed (eq. 5). n is the number of slots of the fact. V: the
    fact's δ (v*, eq. 1) at the last edited layer, kept where it was solved for the raw
    prompt and the chat question both (subject keys: the subject's δ, for all the facts
    edited with it), so that a sleep can key it without solving it again.
    """

    a: dict[int, torch.Tensor] = field(default_factory=dict)
    b: dict[int, torch.Tensor] = field(default_factory=dict)
    k: dict[int, torch.Tensor] = field(default_factory=dict)
    v: dict[int, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for l in self.a:
            out[f"A.{l}"] = self.a[l].detach().cpu().contiguous()
            out[f"B.{l}"] = self.b[l].detach().cpu().contiguous()
            out[f"K.{l}"] = self.k[l].detach().cpu().contiguous()
        for l in self.v:
            out[f"V.{l}"] = self.v[l].detach().cpu().contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], device: Where[int] = "cpu") -> "FactEdit":
        """An edit from its stored tensors, each layer's on `device` (or `device(layer)`: its layer's)."""
        e = cls()
        for name, t in tensors.items():
            kind, layer = name.split(".")
            getattr(e, kind.lower())[int(layer)] = t.to(place(device, int(layer)))
        return e

    def factors(self, arch: Architecture) -> dict[str, Factor]:
        """Per module name, the (A, B) whose product is this edit's delta."""
        return {arch.down_name(l): (self.a[l], self.b[l]) for l in self.a}

    def joined(self, other: "FactEdit") -> "FactEdit":
        """One edit holding both deltas (their slots side by side: ΔW = A·B + A'·B')."""
        return FactEdit({l: torch.cat([self.a[l], other.a[l]], dim=1) for l in self.a},
                        {l: torch.cat([self.b[l], other.b[l]]) for l in self.b},
                        {l: torch.cat([self.k[l], other.k[l]]) for l in self.k}, self.v)


@dataclass
class InjectStats:
    seconds: float
    v_seconds: float  # of which v* (the rest: key passes and solves)
    v_loss_before: float
    v_loss_after: float
    v_steps: int
    n_slots: int
    knocked_out: int = 0  # earlier facts the batch's first try knocked out (Memory._edit_guarded)
    second_try: bool = False  # the guard's second try was kept
    chat: bool = True  # also edited for the chat question
    raw_only_again: int = 0  # held facts edited again raw-only (MemitConfig.chat_edit_max_facts)
    reconsolidated: int = 0  # facts written into their subjects' keyed entries instead (`reconsolidate`)


class MemitEditor:
    """Computes and applies MEMIT edits for batches of facts on one model."""

    def __init__(
        self,
        model: torch.nn.Module,
        arch: Architecture,
        tokenizer: Any,
        layers: Sequence[int],
        covariances: dict[int, torch.Tensor],
        cfg: MemitConfig,
        weights: LiveWeights,
        cov_inv: dict[int, torch.Tensor] | None = None,
    ) -> None:
        """`cov_inv`: Ĉ⁻¹ per layer, computed before for these covariances (another user's
        editor of the model); without it they are computed here (~0.45 s a layer on one
        thread for SmolLM2-135M)."""
        self.model = model
        self.arch = arch
        self.tokenizer = tokenizer
        self.layers = tuple(sorted(layers))
        self.cfg = cfg
        self.cov_inv = cov_inv if cov_inv is not None else {
            l: inverse_covariance(covariances[l].to(arch.layer_device(l))) for l in self.layers}
        self.weights = weights

    def edit(
        self, facts: Sequence[Fact], previous: Sequence[FactEdit], progress: bool = False, *, chat: bool,
        init: dict[str, torch.Tensor] | None = None,
    ) -> tuple[list[FactEdit], InjectStats]:
        """Write `facts` into the live weights; returns one FactEdit per fact.

        `previous` are the active edits (their keys are constraints, eq. 5). `chat`: also
        edit for the chat questions (in place of `cfg.chat_edit`). `init`: a starting δ per
        subject key (`compute_targets`). On any exception the caller must
        `weights.rebuild(...)` to restore the last state.
        """
        cfg = replace(self.cfg, chat_edit=chat)
        device = input_device(self.model)
        with attention_kernels(device):
            return self._edit(facts, previous, progress, device, cfg, init)

    def subject_deltas(self, facts: Sequence[Fact], clamp_norm_factor: float | None = None,
                       init: dict[str, torch.Tensor] | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, ReadKeys]]:
        """v* for `facts` on the live model, raw prompts and chat questions both, without
        writing anything: per subject key, δ at the last edited layer (bounded by
        `clamp_norm_factor`, default the config's; started at `init`'s δ where it has
        one), and the keys the first edited layer's down-projection reads at the
        subject's last token in each prompt (for the keyed memory, `sleepwake.keyed`)."""
        cfg = replace(self.cfg, chat_edit=True, key_positions="subject",
                      clamp_norm_factor=clamp_norm_factor or self.cfg.clamp_norm_factor)
        device = input_device(self.model)
        last = self.layers[-1]
        with attention_kernels(device):
            requests = build_requests(facts, self.tokenizer, cfg)
            slots = make_slots(requests, cfg, device)
            targets = compute_targets(self.model, self.arch, self.tokenizer, requests, slots, last, cfg, init)
            keys = self.keys_at(requests, self.layers[0])
        deltas: dict[str, torch.Tensor] = {}
        for s, r in enumerate(slots.request.tolist()):
            deltas.setdefault(requests[r].subject, targets.deltas[s])
        return deltas, _by_subject(requests, keys)

    def subject_keys(self, facts: Sequence[Fact]) -> dict[str, ReadKeys]:
        """Where the live model reads each subject of `facts`, raw prompts and chat questions."""
        cfg = replace(self.cfg, chat_edit=True, key_positions="subject")
        requests = build_requests(facts, self.tokenizer, cfg)
        with attention_kernels(input_device(self.model)):
            return _by_subject(requests, self.keys_at(requests, self.layers[0]))

    def keys_at(self, requests: Sequence[Any], layer: int) -> ReadKeys:
        """The down-projection input of `layer` at each request's subject token, and at its head."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = input_device(self.model)
        at = self.arch.layer_device(layer)  # the keys are read there, and stay there
        keys, heads = [], []
        # Chat questions batched together run their shared system turn once (`shared_prefix`).
        order = sorted(range(len(requests)), key=lambda i: requests[i].kind)
        step = rows_per_pass(device)
        for start in range(0, len(order), step):
            part = [requests[i] for i in order[start:start + step]]
            seqs = [q.ids[: q.subject_pos + 1] for q in part]
            head_pos = [q.subject_pos if q.head_pos is None else q.head_pos for q in part]
            shared, extra = shared_prefix(self.model, seqs, min(head_pos))
            batch = ({"input_ids": pad_right([s[shared:] for s in seqs], pad, device)["input_ids"], **extra}
                     if shared else pad_right(seqs, pad, device))
            captured, _ = run_capture(self.model, self.arch, batch, key_layers=(layer,))
            rows = torch.arange(len(part), device=at)
            cols = torch.tensor([q.subject_pos - shared for q in part], device=at)
            head_cols = torch.tensor([p - shared for p in head_pos], device=at)
            keys.append(captured[layer][rows, cols].float())
            has_head = torch.tensor([q.head_pos is not None for q in part], device=at)
            heads.append(captured[layer][rows, head_cols].float() * has_head[:, None])
        unsort = torch.tensor(order).argsort().to(at)  # back to the requests' order
        backs = torch.tensor([0 if q.head_pos is None else q.subject_pos - q.head_pos for q in requests])
        return ReadKeys(torch.cat(keys)[unsort], torch.cat(heads)[unsort], backs.to(at))

    def _edit(
        self, facts: Sequence[Fact], previous: Sequence[FactEdit], progress: bool, device: torch.device,
        cfg: MemitConfig, init: dict[str, torch.Tensor] | None = None,
    ) -> tuple[list[FactEdit], InjectStats]:
        t0 = time.perf_counter()
        requests = build_requests(facts, self.tokenizer, cfg)
        slots = make_slots(requests, cfg, device)
        last = self.layers[-1]
        targets = compute_targets(self.model, self.arch, self.tokenizer, requests, slots, last, cfg, init)
        v_seconds = time.perf_counter() - t0
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # Keys and hidden states are read at the slots only, and attention is causal:
        # tokens after a row's last slot cannot change them, so the passes stop there.
        last_slot = [0] * len(requests)
        for r, c in zip(slots.rows.tolist(), slots.cols.tolist()):
            last_slot[r] = max(last_slot[r], c)
        batch = pad_right([q.ids[: last_slot[r] + 1] for r, q in enumerate(requests)], pad, device)
        edits = [FactEdit() for _ in facts]
        slot_fact = slots.fact.tolist()
        per_fact = [[s for s, f in enumerate(slot_fact) if f == i] for i in range(len(facts))]
        if cfg.chat_edit and cfg.key_positions == "subject":
            for e, idx in zip(edits, per_fact):
                e.v[last] = targets.deltas[idx[0]].contiguous()
        # Layers below the previous pass's edited layer are as they were then: each pass
        # replays the output of the layer below this one from the pass before.
        replay: tuple[int, object] | None = None
        for i, layer in enumerate(tqdm(self.layers, desc="layers", disable=not progress, leave=False)):
            post = self.arch.post_norm(layer)
            seen: dict[str, object] = {}
            handles = []
            if post is not None:  # also read the down-projection's output
                handles.append(self.arch.down_proj(layer).register_forward_hook(
                    lambda _m, _a, o: seen.__setitem__("mlp_out", o.detach())))
            if layer > 0 and i + 1 < len(self.layers):
                handles.append(self.arch.layers[layer - 1].register_forward_hook(
                    lambda _m, _a, o: seen.__setitem__("below", o)))
            try:
                with frozen_prefix(self.arch, *replay) if replay else contextlib.nullcontext():
                    keys, hid = run_capture(self.model, self.arch, batch, key_layers=(layer,), hidden_layers=(last,))
            finally:
                for h in handles:
                    h.remove()
            replay = (layer - 1, seen["below"]) if "below" in seen else None
            # Everything of this layer's solve is on its device (a device_map may put each layer elsewhere).
            at = keys[layer].device
            rows, cols = slots.rows.to(at), slots.cols.to(at)
            k = keys[layer][rows, cols].float()
            top = hid[last]
            cur = top[slots.rows.to(top.device), slots.cols.to(top.device)].float()
            resid = ((targets.values - cur) / (len(self.layers) - i)).to(at)
            if post is not None:  # the residual change this layer owes, as a down-projection change
                resid = through_post_norm(post, seen["mlp_out"][rows, cols], resid)
            prev = None
            if cfg.constrain_previous and previous:
                prev = torch.cat([e.k[layer].to(at) for e in previous if layer in e.k])
            a, b = solve_update(resid, k, self.cov_inv[layer], self.cfg.lambda_reg, prev)
            for f, idx in enumerate(per_fact):
                ix = torch.tensor(idx, dtype=torch.long, device=at)
                edits[f].a[layer] = a[:, ix].contiguous()
                edits[f].b[layer] = b[ix].contiguous()
                edits[f].k[layer] = k[ix].contiguous()
            self.weights.add(self.arch.down_name(layer), [(e.a[layer], e.b[layer]) for e in edits])
        stats = InjectStats(
            time.perf_counter() - t0, v_seconds, targets.loss_before, targets.loss_after, targets.steps, len(slot_fact),
            chat=cfg.chat_edit,
        )
        return edits, stats
