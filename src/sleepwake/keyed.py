"""The keyed subject memory: where consolidated facts live.

MEMIT writes a subject's facts by finding one vector δ (v*, eq. 1) that, added to the
residual stream at the subject's last token after layer L, makes the model say them,
and then spreads δ over the down-projections of several layers as a weight change.
Weight changes of many facts share those matrices and wear each other out: past about a
hundred facts recall falls and the model drifts.

This memory keeps δ itself, with the keys it is read at: the input of the first MEMIT
layer's down-projection at the subject's last token, in each way the facts were asked
(raw prompt, chat question). Hooks add a subject's δ after layer L at every token whose
key is close to one of that subject's keys (cosine ≥ `threshold`, nearest entry wins),
and do nothing anywhere else. (At that layer a subject's own keys in other sentences
sit at cosine ≥ 0.86 and other subjects' at ≤ 0.61, other text's at ≤ 0.44: 100 facts,
CPU, `benchmarks/keyed_probe.py`.) The last token is mostly the surname, and there a
stranger with the same surname reads like the subject (cosine 0.68–0.99): so a
subject of several words also has a head key, at the last token of its other words
(the first name), which the token that many places back must match too (cosine ≥
`head_threshold`; own 0.82–1.0, same-surname strangers ≤ 0.15, 12 names in four
contexts each). So each subject is exact and independent: ten
thousand subjects cost ten thousand rows, not a shared matrix; text that names no held
subject passes unchanged; and forgetting a subject deletes its rows. Sleep moves
subjects here from MEMIT (`sleep.cycle`); it is the neocortex of the paper, in place of
a LoRA adapter (GRACE, WISE and MEMOIR keep side memories like this one, keyed on
other things).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sleepwake.memit.editor import ReadKeys
from sleepwake.models import Architecture, LoadedModel
from sleepwake.placement import Where, module_device, place
from sleepwake.store import write_atomic
from sleepwake.weights import Factor

DEFAULT_THRESHOLD = 0.8
HEAD_THRESHOLD = 0.5


@dataclass
class Entry:
    """One subject: its δ and the keys it is read at."""

    subject: str  # the subject key (`Fact.subject_key`)
    delta: torch.Tensor  # (d_model,)
    read: ReadKeys  # n_keys rows
    facts: tuple[int, ...] = ()  # the ledger ids of the facts δ was made for
    _digest: str | None = field(default=None, repr=False, compare=False)

    @property
    def keys(self) -> torch.Tensor:
        return self.read.keys

    def digest(self) -> str:
        """A hash of what this entry does, kept: an entry's tensors are never changed in
        place, and a table of thousands is hashed again after each change of one entry."""
        if self._digest is None:
            h = hashlib.blake2b(self.subject.encode(), digest_size=16)
            for t in (self.delta, self.read.keys, self.read.heads, self.read.backs):
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
            self._digest = h.hexdigest()
        return self._digest


@dataclass
class KeyedMemory:
    """Subjects' δs added after `layer`, each read where one of its keys is, matched at
    the input of `match_layer`'s down-projection."""

    layer: int
    match_layer: int
    threshold: float = DEFAULT_THRESHOLD
    entries: dict[str, Entry] = field(default_factory=dict)
    head_threshold: float = HEAD_THRESHOLD
    _digest: str | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.entries)

    def with_entries(self, new: Sequence[Entry], drop: Sequence[str] = ()) -> "KeyedMemory":
        """A new memory: these entries added (replacing a subject's old one), `drop` removed."""
        gone = set(drop)
        entries = {s: e for s, e in self.entries.items() if s not in gone}
        entries.update({e.subject: e for e in new})
        return KeyedMemory(self.layer, self.match_layer, self.threshold, entries, self.head_threshold)

    def without(self, subjects: Sequence[str]) -> "KeyedMemory":
        gone = sorted(set(subjects) & set(self.entries))
        if not gone:
            return self
        out = self.with_entries([], gone)
        out._digest = hashlib.blake2b(f"{self.digest()}|-{chr(0).join(gone)}".encode(), digest_size=16).hexdigest()
        return out

    def digest(self) -> str:
        """A name for what this memory does to the model (for caches of measurements)."""
        if self._digest is None:
            self._digest = self._hash()
        return self._digest

    def _hash(self) -> str:
        h = hashlib.blake2b(f"{self.layer}|{self.match_layer}|{self.threshold!r}|{self.head_threshold!r}".encode(),
                            digest_size=16)
        for s in sorted(self.entries):
            h.update(self.entries[s].digest().encode())
        return h.hexdigest()

    # --- the table as tensors ----------------------------------------------------------

    def table(self, device: torch.device | str) -> tuple[ReadKeys, torch.Tensor, torch.Tensor]:
        """(unit keys and heads of n rows, δs m×d_model, the δ row of each key n) for the hook."""
        entries = list(self.entries.values())
        if not entries:
            raise ValueError("the keyed memory is empty")
        keys = torch.cat([e.read.keys for e in entries]).to(device, torch.float32)
        heads = torch.cat([e.read.heads for e in entries]).to(device, torch.float32)
        backs = torch.cat([e.read.backs for e in entries]).to(device, torch.long)
        owner = torch.cat([torch.full((len(e.keys),), i, dtype=torch.long) for i, e in enumerate(entries)])
        deltas = torch.stack([e.delta for e in entries]).to(device, torch.float32)
        read = ReadKeys(F.normalize(keys, dim=-1), F.normalize(heads, dim=-1), backs)
        return read, deltas, owner.to(device)

    # --- on disk --------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """One safetensors file, written atomically (subjects in the metadata)."""
        from safetensors.torch import save_file

        tensors, meta = {}, {"layer": str(self.layer), "match_layer": str(self.match_layer),
                             "threshold": repr(self.threshold), "head_threshold": repr(self.head_threshold)}
        for i, e in enumerate(self.entries.values()):
            tensors[f"delta.{i}"] = e.delta.detach().cpu().float().contiguous()
            tensors[f"keys.{i}"] = e.read.keys.detach().cpu().float().contiguous()
            tensors[f"heads.{i}"] = e.read.heads.detach().cpu().float().contiguous()
            tensors[f"backs.{i}"] = e.read.backs.detach().cpu().long().contiguous()
            meta[f"subject.{i}"] = e.subject
            meta[f"facts.{i}"] = ",".join(map(str, e.facts))
        meta["n"] = str(len(self.entries))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: Where[int] = "cpu") -> "KeyedMemory":
        """A table from its file: keys on `device` (or the match layer's, `device(layer)`),
        δs on `device` (or the layer's they are added at), as MEMIT makes them."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta, names = f.metadata(), set(f.keys())
            layer, match_layer = int(meta["layer"]), int(meta["match_layer"])
            at, to = place(device, match_layer), place(device, layer)
            entries = {}
            for i in range(int(meta["n"])):
                subject = meta[f"subject.{i}"]
                ids = tuple(int(x) for x in meta.get(f"facts.{i}", "").split(",") if x)
                keys = f.get_tensor(f"keys.{i}").to(at)
                if f"heads.{i}" in names:
                    read = ReadKeys(keys, f.get_tensor(f"heads.{i}").to(at), f.get_tensor(f"backs.{i}").to(at))
                else:  # a table from before head keys: matched at the last token alone
                    read = ReadKeys(keys, torch.zeros_like(keys), torch.zeros(len(keys), dtype=torch.long, device=at))
                entries[subject] = Entry(subject, f.get_tensor(f"delta.{i}").to(to), read, ids)
        return cls(layer, match_layer, float(meta["threshold"]), entries,
                   float(meta.get("head_threshold", HEAD_THRESHOLD)))


def is_keyed_file(path: str | os.PathLike[str]) -> bool:
    """Whether a consolidated-memory path of the ledger is a keyed table (else a LoRA adapter)."""
    return str(path).endswith(".safetensors")


def install(lm: LoadedModel, memory: KeyedMemory | None, memit: dict[int, Factor] | None = None) -> None:
    """Make `lm` read `memory` (or no keyed memory), replacing what it read before;
    `memit` are the MEMIT deltas in the live weights, per layer, which the positions
    the memory reads must not see (`attach`).

    The hooks live on the loaded model, not on a `Memory`: several `Memory` objects can
    share one model, and the one that rebuilds it last decides what it reads."""
    digest = memory.digest() if memory is not None and len(memory) else ""
    if digest and memit:
        h = hashlib.blake2b(digest.encode(), digest_size=16)
        for layer in sorted(memit):
            for t in memit[layer]:
                h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
        digest = h.hexdigest()
    lm.keyed = memory if digest else None
    if digest == lm.hooks_digest:
        return
    for handle in lm.hooks:
        handle.remove()
    lm.hooks = attach(lm.arch, memory, memit or {})
    lm.hooks_digest = digest
    lm.weights_version += 1


@torch.no_grad()
def _match(seen: torch.Tensor, n: int, read: ReadKeys, threshold: float, head_threshold: float
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """For the last `n` positions of `seen` (batch, seq, d_in, unit rows): the best key's
    index, and whether one matches.

    A key matches where the position is close to it and, for a key with a head, the
    position `back` tokens earlier is close to its head; the best match has the highest
    sum of the two. The positions before the last `n` are there for the heads: decoding
    with a KV cache feeds one token a pass."""
    x = seen[:, -n:]
    sims = x @ read.keys.T
    ok = sims >= threshold
    idx = torch.zeros(sims.shape[:-1], dtype=torch.long, device=sims.device)
    hit = torch.zeros(sims.shape[:-1], dtype=torch.bool, device=sims.device)
    # Only the few positions some key is close to are scored further: with thousands of
    # key rows, working on every position's row of scores cost more than the model.
    b, t = ok.any(dim=-1).nonzero(as_tuple=True)
    if not len(b):
        return idx, hit
    ok, score = ok[b, t], sims[b, t]
    pos = t + (seen.shape[1] - n)
    for back in read.backs.unique().tolist():
        if back == 0:
            continue
        cols = (read.backs == back).nonzero().squeeze(1)
        src = pos - back
        earlier = seen[b, src.clamp(min=0)] * (src >= 0)[:, None]  # nothing before the start
        heads = earlier @ read.heads[cols].T
        ok[:, cols] &= heads >= head_threshold
        score[:, cols] += heads
    best, i = score.masked_fill(~ok, float("-inf")).max(dim=-1)
    idx[b, t], hit[b, t] = i, torch.isfinite(best)
    return idx, hit


def attach(arch: Architecture, memory: KeyedMemory | None, memit: dict[int, Factor]
           ) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks that make the model read `memory`; remove them to detach it.

    Each forward pass: the keys at `match_layer` (the first layer MEMIT edits, so no
    MEMIT edit has touched them yet) pick the positions that read an entry; at those
    positions every layer's MEMIT delta is taken back out of the down-projection's
    output, so a held subject is read on the weights its δ was made on, whatever
    MEMIT holds meanwhile (measured: 93 consolidated facts, 27 in MEMIT: 0.33 of them
    answered without this, 1.00 with MEMIT out); after `layer` the entry's δ is added.
    A pass that replays layer outputs without running them (v*'s `frozen_prefix`)
    matches nothing and adds nothing again: the replayed output already holds it."""
    if memory is None or not len(memory):
        return []
    # Matched where the match layer computes, added where `layer` does (a device_map may split them).
    keys, deltas, owner = memory.table(arch.layer_device(memory.match_layer))
    deltas = deltas.to(module_device(arch.layers[memory.layer]))
    # Per thread: a sleep works on the live model while replies run on a copy of it,
    # and the copy shares these hooks.
    local = threading.local()

    reach = int(keys.backs.max())  # how far back a head key is read

    def start(_m: nn.Module, _args: tuple, kwargs: dict) -> None:
        local.hit = None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        local.continuing = cache is not None and getattr(cache, "get_seq_length", lambda: 0)() > 0

    def match(_m: nn.Module, args: tuple) -> None:
        x = F.normalize(args[0].float(), dim=-1).reshape(-1, args[0].shape[-2], args[0].shape[-1])
        tail = getattr(local, "tail", None) if getattr(local, "continuing", False) else None
        if tail is not None and tail.shape[0] == 1:  # a shared prefix run once for a batch (`evaluate`)
            tail = tail.expand(x.shape[0], -1, -1)
        seen = torch.cat([tail, x], dim=1) if tail is not None and tail.shape[0] == x.shape[0] else x
        idx, hit = _match(seen, x.shape[1], keys, memory.threshold, memory.head_threshold)
        local.tail = seen[:, -reach:] if reach else None  # where later passes of this sequence read heads
        idx, hit = idx.view(args[0].shape[:-1]), hit.view(args[0].shape[:-1])
        local.hit = (owner[idx], hit) if bool(hit.any()) else None

    def unedit(layer: int) -> Callable:
        left, right = (t.to(arch.layer_device(layer), torch.float32) for t in memit[layer])

        def hook(_m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            hit = getattr(local, "hit", None)
            if hit is None:
                return out
            mine = (args[0].float() @ right.T) @ left.T
            return out - (mine * hit[1].to(mine.device)[..., None]).to(out.dtype)

        return hook

    def add(_m: nn.Module, _a: tuple, out: object) -> object:
        hit = getattr(local, "hit", None)
        if hit is None:
            return out
        rows, mask = hit
        h = out[0] if isinstance(out, tuple) else out
        h = h + (deltas[rows.to(deltas.device)] * mask.to(deltas.device)[..., None]).to(h.device, h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handles = [arch.layers[0].register_forward_pre_hook(start, with_kwargs=True),
               arch.down_proj(memory.match_layer).register_forward_pre_hook(match)]
    handles += [arch.down_proj(l).register_forward_hook(unedit(l)) for l in sorted(memit)]
    handles.append(arch.layers[memory.layer].register_forward_hook(add))
    return handles
