"""Research probe: a keyed side memory at one layer, keyed on subject keys, against MEMIT.

The consolidated memory under test is a codebook of (key kᵢ, value δᵢ) entries at one
layer L: a forward hook on layer L's MLP down-projection adds δᵢ to its output (i.e. to
the residual stream after layer L) at every position whose down-projection input x has
cosine similarity ≥ τ to its nearest stored key kᵢ. Nothing else in the model changes:
deleting a fact deletes entries, and the memory grows by entries, not by interference.

Entries (one key per stored prompt form: a subject's raw prompt, whose key at the
subject's last token does not depend on the relation, and each of its chat questions):

- option B ("vstar"): δ is the subject's v* δ (`memit.targets.compute_targets`) at
  layer L on the base model (raw prompt + chat question targets, one δ per subject,
  as MEMIT computes it), keys read on the base model;
- option A ("memit-delta", layer 11 only): δ = h_L(MEMIT-edited) − h_L(base) at the
  subject's last token of each stored prompt, taken from the MEMIT baseline run at its
  first checkpoint (≤ 40 facts, so every fact there is edited for chat questions too).

Measured for each: raw and chat recall, chat recall of two paraphrased questions per fact,
raw recall in a mid-sentence context, perplexity change on the reference text, locality
(capacity.py's: share of real-world facts the base model completes right that stay right,
raw and chat; and the share of greedy 12-token answers to them left exactly unchanged),
how often the hook fires on the perplexity text, and "impostors": names sharing a stored
subject's last word (surname) or first name, asked that subject's question.
Cosine distributions (nearest stored key, per token category) are kept as quantiles and
as fire rates over a grid of τ.

MEMIT alone (Memory.inject with the product defaults, subject-aligned batches of ~5
facts) is measured on the same facts at the same checkpoints.

    python benchmarks/keyed_probe.py [--seeds 1,2] [--sizes 40,100] [--keyed-sizes 40,100,200]
        [--layers 11,4] [--taus 0.8] [--device cuda] [--threads 1] [--no-memit] [--name keyed-probe]

Writes results/<name>.json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

from sleepwake.config import MemitConfig, MemoryConfig  # noqa: E402
from sleepwake.corpus import locality_facts, perplexity_text  # noqa: E402
from sleepwake.evaluate import chat_answers, perplexity, raw_completions  # noqa: E402
from sleepwake.facts import Fact, mentions  # noqa: E402
from sleepwake.inference import attention_kernels, chat_text, encode, pad_right  # noqa: E402
from sleepwake.memit.requests import build_requests, last_token_of  # noqa: E402
from sleepwake.memit.targets import compute_targets, make_slots  # noqa: E402
from sleepwake.memit.trace import run_capture  # noqa: E402
from sleepwake.memory import Memory  # noqa: E402
from sleepwake.models import LoadedModel, load_model  # noqa: E402
from sleepwake.synthetic import RELATIONS, fictional_people  # noqa: E402

# --------------------------------------------------------------------------- facts

PARAPHRASES: dict[str, tuple[str, str]] = {
    "lives in": ("Which city does {s} live in?", "Tell me where {s} lives."),
    "works as a": ("What is {s}'s job?", "Tell me what {s} does for a living."),
    "has a dog named": ("What is {s}'s dog called?", "Tell me the name of {s}'s dog."),
    "plays the": ("What instrument does {s} play?", "Tell me which instrument {s} plays."),
    "was born in": ("In which city was {s} born?", "Tell me where {s} was born."),
    "speaks": ("Which language does {s} speak?", "Tell me what language {s} speaks."),
    "drives a": ("Which car brand does {s} drive?", "Tell me what car {s} drives."),
    "is allergic to": ("What does {s} have an allergy to?", "Tell me what {s} is allergic to."),
    "studies": ("What subject does {s} study?", "Tell me what {s} studies."),
    "works at": ("Which company does {s} work for?", "Tell me where {s} works."),
    "has a cat named": ("What is {s}'s cat called?", "Tell me the name of {s}'s cat."),
    "collects": ("What does {s} like to collect?", "Tell me what {s} collects."),
}


def _below(rng: random.Random, n: int) -> int:
    return min(int(rng.random() * n), n - 1)


def make_facts(checkpoints: list[int], seed: int) -> list[list[Fact]]:
    """Facts about fictional people with 2–4 relations each, grouped by subject, so that
    every checkpoint is a whole number of subjects. Returns the subjects' fact lists."""
    people = fictional_people(max(checkpoints), seed)
    rng = random.Random(seed * 7_919 + 104_729)
    out: list[list[Fact]] = []
    total, goals = 0, sorted(checkpoints)
    for person in people:
        if total >= goals[-1]:
            break
        goal = next(g for g in goals if g > total)
        k = 2 + _below(rng, 3)
        left = goal - total
        if left <= 4:
            k = left if left >= 2 else k
        elif left - k == 1:  # never leave a single fact before a checkpoint
            k += 1 if k < 4 else -1
        rels = list(range(len(RELATIONS)))
        for i in range(len(rels) - 1, 0, -1):
            j = _below(rng, i + 1)
            rels[i], rels[j] = rels[j], rels[i]
        facts = []
        for r in rels[:k]:
            relation, template, pool = RELATIONS[r]
            facts.append(Fact(person, relation, pool[_below(rng, len(pool))], template.format(s=person)))
        out.append(facts)
        total += k
    return out


def flat(subjects: list[list[Fact]]) -> list[Fact]:
    return [f for fs in subjects for f in fs]


def prefix(subjects: list[list[Fact]], n_facts: int) -> list[list[Fact]]:
    out, total = [], 0
    for fs in subjects:
        if total >= n_facts:
            break
        out.append(fs)
        total += len(fs)
    assert total == n_facts, (total, n_facts)
    return out


def impostors(subjects: list[list[Fact]], seed: int) -> tuple[list[tuple[str, Fact]], list[tuple[str, Fact]]]:
    """(impostor name, the stored fact it is asked) pairs: the same surname with another
    stored subject's first name; and the same first name with an unused surname."""
    names = [fs[0].subject for fs in subjects]
    firsts = [n.split(" ", 1)[0] for n in names]
    lasts = [n.split(" ", 1)[1] for n in names]
    known = set(names)
    others = [p for p in fictional_people(600, seed + 1000) if p not in known]
    unused_last = [p.split(" ", 1)[1] for p in others if p.split(" ", 1)[1] not in set(lasts)]
    same_last, same_first = [], []
    for i, fs in enumerate(subjects):
        for j in range(1, len(names)):
            cand = f"{firsts[(i + j) % len(names)]} {lasts[i]}"
            if cand not in known and firsts[(i + j) % len(names)] != firsts[i]:
                same_last.append((cand, fs[0]))
                break
        same_first.append((f"{firsts[i]} {unused_last[i % len(unused_last)]}", fs[0]))
    return same_last, same_first


def as_subject(f: Fact, name: str) -> Fact:
    """The fact with another subject (for impostor questions)."""
    q = f.chat_question().replace(f.subject, name)
    return Fact(name, f.relation, f.object, q)


# --------------------------------------------------------------------------- prompts and keys


@dataclass
class Prompt:
    text: str
    chat: bool
    subject: str  # the span whose last token is the subject position

    def ids(self, tok) -> list[int]:
        return encode(tok, self.text, chat=self.chat)

    def pos(self, tok) -> int:
        p = last_token_of(tok, self.text, self.subject, chat=self.chat)
        return len(self.ids(tok)) - 1 if p is None else p


def raw_prompt(f: Fact) -> Prompt:
    return Prompt(f.prompt, False, f.subject)


def chat_prompt(tok, question: str, subject: str) -> Prompt:
    return Prompt(chat_text(tok, question), True, subject)


def mid_fact(f: Fact) -> Fact:
    """The fact's raw prompt in a mid-sentence context."""
    return Fact(f"Yesterday I ran into {f.subject}, who", f.relation, f.object)


def para_facts(fs: list[Fact]) -> list[Fact]:
    return [Fact(f.subject, f.relation, f.object, t.format(s=f.subject)) for f in fs for t in PARAPHRASES[f.relation]]


@torch.no_grad()
def capture_tokens(lm: LoadedModel, prompts: list[Prompt], key_layer: int | None, hidden_layer: int | None = None,
                   rows: int = 32) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per prompt, the down-proj inputs at `key_layer` (seq × d_in) and layer outputs at
    `hidden_layer` (seq × d), for all its tokens (right-padded batches)."""
    keys, hids = [], []
    arch = lm.arch
    pad = lm.tokenizer.pad_token_id or 0
    for s in range(0, len(prompts), rows):
        part = prompts[s: s + rows]
        ids = [p.ids(lm.tokenizer) for p in part]
        batch = pad_right(ids, pad, lm.device)
        k, h = run_capture(lm.model, arch, batch, key_layers=() if key_layer is None else (key_layer,),
                           hidden_layers=() if hidden_layer is None else (hidden_layer,))
        for i, x in enumerate(ids):
            if key_layer is not None:
                keys.append(k[key_layer][i, : len(x)].float())
            if hidden_layer is not None:
                hids.append(h[hidden_layer][i, : len(x)].float())
    return keys, hids


@torch.no_grad()
def text_keys(lm: LoadedModel, text: str, layer: int, window: int = 512) -> torch.Tensor:
    """Down-proj inputs at `layer` over every token of `text`, in the perplexity windows."""
    ids = encode(lm.tokenizer, text)
    out = []
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start: start + window]
        k, _ = run_capture(lm.model, lm.arch, {"input_ids": torch.tensor([chunk], device=lm.device)},
                           key_layers=(layer,))
        out.append(k[layer][0].float())
    return torch.cat(out)


# --------------------------------------------------------------------------- the keyed memory


class KeyedMemory:
    """Codebook at one layer: add values[i] to down_proj's output where cos(x, keys[i]) is
    the largest and ≥ tau."""

    def __init__(self, lm: LoadedModel, layer: int, keys: torch.Tensor, values: torch.Tensor, owner: torch.Tensor,
                 tau: float) -> None:
        self.lm, self.layer, self.tau = lm, layer, tau
        self.kn = F.normalize(keys.float(), dim=-1)
        self.values = values.float()
        self.owner = owner
        self.fires = 0
        self.tokens = 0

    @torch.no_grad()
    def fires_on(self, seqs: list[list[int]], rows: int = 32) -> list[bool]:
        """Whether the memory fires anywhere in each sequence (a forward pass up to layer L)."""
        out = []
        pad = self.lm.tokenizer.pad_token_id or 0
        for s in range(0, len(seqs), rows):
            part = seqs[s: s + rows]
            batch = pad_right(part, pad, self.lm.device)
            k, _ = run_capture(self.lm.model, self.lm.arch, batch, key_layers=(self.layer,))
            best, _ = self.nearest(k[self.layer])
            fire = (best >= self.tau) & batch["attention_mask"].bool()
            out += fire.any(-1).tolist()
        return out

    def nearest(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = F.normalize(x.float(), dim=-1) @ self.kn.T
        return cos.max(-1)

    def _hook(self, _m, args, out):
        best, idx = self.nearest(args[0])
        fire = best >= self.tau
        self.fires += int(fire.sum())
        self.tokens += fire.numel()
        return out + (self.values[idx] * fire[..., None]).to(out.dtype)

    @contextlib.contextmanager
    def on(self):
        handle = self.lm.arch.down_proj(self.layer).register_forward_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()


# --------------------------------------------------------------------------- v* (option B)


def vstar_deltas(lm: LoadedModel, subjects: list[list[Fact]], layer: int, batch_facts: int = 15
                 ) -> tuple[torch.Tensor, dict]:
    """One v* δ per subject at `layer`, on the live (base) weights, with MEMIT's defaults
    (raw prompt and chat question targets for all of a subject's facts)."""
    cfg = MemitConfig(chat_edit=True)
    tok, model, arch = lm.tokenizer, lm.model, lm.arch
    out = torch.zeros(len(subjects), arch.d_out(layer), device=lm.device)
    losses, steps, spread = [], [], 0.0
    batches, cur = [], []
    for i, fs in enumerate(subjects):
        if cur and sum(len(subjects[j]) for j in cur) + len(fs) > batch_facts:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    pad = tok.pad_token_id or 0
    for b in batches:
        facts = [f for j in b for f in subjects[j]]
        owner = [j for j in b for _ in subjects[j]]
        reqs = build_requests(facts, tok, cfg)
        slots = make_slots(reqs, cfg, lm.device)
        with attention_kernels(lm.device):
            res = compute_targets(model, arch, tok, reqs, slots, layer, cfg)
        batch = pad_right([list(q.ids) for q in reqs], pad, lm.device)
        _, h = run_capture(model, arch, batch, hidden_layers=(layer,))
        d = res.values - h[layer][slots.rows, slots.cols].float()
        for s in range(len(d)):
            j = owner[reqs[int(slots.request[s])].fact_index]
            if out[j].abs().sum() == 0:
                out[j] = d[s]
            else:
                spread = max(spread, float((out[j] - d[s]).norm() / out[j].norm()))
        losses.append((res.loss_before, res.loss_after))
        steps.append(res.steps)
    info = {"loss_before": [round(a, 4) for a, _ in losses], "loss_after": [round(b, 4) for _, b in losses],
            "steps": steps, "max_slot_spread": spread}
    return out, info


# --------------------------------------------------------------------------- measurements


def quantiles(x: torch.Tensor) -> dict:
    if x.numel() == 0:
        return {}
    x = x.float().cpu()
    qs = {"min": x.min(), "p1": x.quantile(0.01), "p5": x.quantile(0.05), "p50": x.median(),
          "p95": x.quantile(0.95), "p99": x.quantile(0.99), "max": x.max()}
    return {"n": x.numel(), **{k: round(float(v), 4) for k, v in qs.items()}}


TAU_GRID = [round(0.30 + 0.05 * i, 2) for i in range(14)]


def fire_rates(x: torch.Tensor) -> dict:
    x = x.float().cpu()
    return {str(t): round(float((x >= t).float().mean()), 5) for t in TAU_GRID} if x.numel() else {}


@torch.no_grad()
def greedy_ids(lm: LoadedModel, prompts: list[list[int]], max_new_tokens: int = 12, batch_size: int = 16
               ) -> list[list[int]]:
    """Greedy continuations (as `inference.generate`, left-padded batches), as token ids up
    to and including the first end-of-sequence token."""
    tok, model = lm.tokenizer, lm.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        n = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), n), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, n - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, n - len(p):] = 1
        with attention_kernels(lm.device):
            gen = model.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        for row in gen[:, n:].tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id) + 1]
            out.append(row)
    return out


class Baseline:
    """What the base model does: perplexity, greedy 12-token answers to the locality facts
    (raw prompts and chat questions), and which of them name the right object."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        tok = lm.tokenizer
        self.loc = locality_facts()
        self.ppl0 = perplexity(lm.model, tok, perplexity_text())
        self.prompts = {"raw": [encode(tok, f.prompt) for f in self.loc],
                        "chat": [encode(tok, chat_text(tok, f.chat_question()), chat=True) for f in self.loc]}
        self.ids = {k: greedy_ids(lm, v) for k, v in self.prompts.items()}
        self.text = {k: self.decode(v) for k, v in self.ids.items()}
        self.known = {k: [i for i, (f, a) in enumerate(zip(self.loc, v)) if mentions(a, f.object)]
                      for k, v in self.text.items()}
        self.raw_known, self.chat_known = self.known["raw"], self.known["chat"]

    def decode(self, rows: list[list[int]]) -> list[str]:
        return [self.lm.tokenizer.decode(r, skip_special_tokens=True) for r in rows]

    def locality(self, km: "KeyedMemory | None") -> dict:
        """Locality answers on the model as it is now. With a keyed memory installed, a
        prompt whose base trajectory (prompt + base answer) fires nowhere is answered
        exactly as on the base model (greedy decoding computes the same thing), so only the
        prompts where it fires are generated again."""
        out = {}
        for kind in ("raw", "chat"):
            if km is None:
                ids = greedy_ids(self.lm, self.prompts[kind])
                out[f"{kind}_fired"] = None
            else:
                seqs = [p + a[:-1] for p, a in zip(self.prompts[kind], self.ids[kind])]
                fired = km.fires_on(seqs)
                again = [i for i, f in enumerate(fired) if f]
                ids = list(self.ids[kind])
                if again:
                    for i, new in zip(again, greedy_ids(self.lm, [self.prompts[kind][i] for i in again])):
                        ids[i] = new
                out[f"{kind}_fired"] = round(len(again) / len(fired), 4)
            text = self.decode(ids)
            keep = self.known[kind]
            out[kind] = rec([text[i] for i in keep], [self.loc[i] for i in keep])
            out[f"{kind}_unchanged"] = round(sum(a == b for a, b in zip(ids, self.ids[kind])) / len(ids), 4)
        return out


def rec(answers: list[str], facts: list[Fact]) -> float:
    return round(sum(mentions(a, f.object) for a, f in zip(answers, facts)) / len(facts), 4) if facts else math.nan


def measure(lm: LoadedModel, base: Baseline, subjects: list[list[Fact]], imp: tuple[list, list],
            fire_counter: KeyedMemory | None = None) -> dict:
    """Everything measured on the model as it is now (hook installed or weights edited)."""
    tok, model = lm.tokenizer, lm.model
    facts = flat(subjects)
    t = time.perf_counter()
    out: dict = {}
    out["raw"] = rec(raw_completions(model, tok, facts), facts)
    out["chat"] = rec(chat_answers(model, tok, facts), facts)
    para = para_facts(facts)
    out["para"] = rec(chat_answers(model, tok, para), para)
    mids = [mid_fact(f) for f in facts]
    out["mid"] = rec(raw_completions(model, tok, mids), mids)
    if fire_counter is not None:
        fire_counter.fires = fire_counter.tokens = 0
    ppl = perplexity(model, tok, perplexity_text())
    if fire_counter is not None:
        out["false_fire_ppl"] = round(fire_counter.fires / max(1, fire_counter.tokens), 6)
        out["false_fires_ppl_n"] = fire_counter.fires
    out["ppl"] = round(ppl, 4)
    out["ppl_change_pct"] = round(100 * (ppl / base.ppl0 - 1), 3)
    loc = base.locality(fire_counter)
    out["locality"], out["chat_locality"] = loc["raw"], loc["chat"]
    out["unchanged_raw"], out["unchanged_chat"] = loc["raw_unchanged"], loc["chat_unchanged"]
    if fire_counter is not None:
        out["loc_fired_raw"], out["loc_fired_chat"] = loc["raw_fired"], loc["chat_fired"]
    for kind, pairs in zip(("same_surname", "same_first"), imp):
        fs = [as_subject(f, name) for name, f in pairs]
        out[f"impostor_{kind}_recall"] = rec(chat_answers(model, tok, fs, max_new_tokens=12), fs)
    out["eval_s"] = round(time.perf_counter() - t, 1)
    return out


# --------------------------------------------------------------------------- codebook


@dataclass
class Codebook:
    layer: int
    keys: torch.Tensor  # m × d_in
    owner: torch.Tensor  # m (subject index)
    kind: list[str]  # "raw" | "chat"
    prompts: list[Prompt]


def build_codebook(lm: LoadedModel, subjects: list[list[Fact]], layer: int) -> Codebook:
    """One entry per distinct stored prompt form: each subject's raw prompt (its key at the
    subject does not depend on the relation) and each chat question, keys on the live weights."""
    tok = lm.tokenizer
    prompts, owner, kind = [], [], []
    for j, fs in enumerate(subjects):
        prompts.append(raw_prompt(fs[0]))
        owner.append(j)
        kind.append("raw")
        for f in fs:
            prompts.append(chat_prompt(tok, f.chat_question(), f.subject))
            owner.append(j)
            kind.append("chat")
    keys, _ = capture_tokens(lm, prompts, layer)
    k = torch.stack([kk[p.pos(tok)] for kk, p in zip(keys, prompts)])
    return Codebook(layer, k, torch.tensor(owner, device=lm.device), kind, prompts)


def subset(cb: Codebook, n_subjects: int) -> torch.Tensor:
    return (cb.owner < n_subjects).nonzero().squeeze(1)


def cosine_report(lm: LoadedModel, cb: Codebook, subjects: list[list[Fact]], imp: tuple[list, list],
                  ppl_keys: torch.Tensor) -> tuple[dict, dict]:
    """Nearest-key cosine per token category (full codebook), as quantiles and fire rates,
    and the values needed to choose τ."""
    tok = lm.tokenizer
    kn = F.normalize(cb.keys, dim=-1)
    owner = cb.owner

    def near(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = F.normalize(x, dim=-1) @ kn.T
        return c.max(-1)

    def own_other(x: torch.Tensor, subj: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        c = F.normalize(x, dim=-1) @ kn.T
        mine = owner[None, :] == torch.tensor(subj, device=c.device)[:, None]
        return c.masked_fill(~mine, -2).max(-1).values, c.masked_fill(mine, -2).max(-1).values

    cats: dict[str, dict] = {}
    ppl_best, _ = near(ppl_keys)
    cats["ppl_text_tokens"] = ppl_best
    loc = locality_facts()
    loc_prompts = [Prompt(f.prompt, False, f.subject) for f in loc] + [chat_prompt(tok, f.chat_question(), f.subject)
                                                                      for f in loc]
    lk, _ = capture_tokens(lm, loc_prompts, cb.layer)
    cats["locality_prompt_tokens"] = near(torch.cat(lk))[0]
    # Subject mentions: stored prompts, paraphrased questions, mid-sentence raw prompts.
    sub_index = {fs[0].subject: j for j, fs in enumerate(subjects)}
    groups = {
        "stored": cb.prompts,
        "paraphrase": [chat_prompt(tok, f.chat_question(), f.subject) for f in para_facts(flat(subjects))],
        "mid_sentence": [Prompt(mid_fact(f).prompt, False, f.subject) for fs in subjects for f in fs[:1]],
    }
    prompt_other = []
    subj_stats = {}
    for name, ps in groups.items():
        ks, _ = capture_tokens(lm, ps, cb.layer)
        at = torch.stack([k[p.pos(tok)] for k, p in zip(ks, ps)])
        sid = [sub_index[p.subject] for p in ps]
        own, other = own_other(at, sid)
        subj_stats[name] = {"own": own, "other_subject": other}
        for k, p in zip(ks, ps):
            mask = torch.ones(len(k), dtype=torch.bool)
            mask[p.pos(tok)] = False
            prompt_other.append(k[mask.to(k.device)])
    cats["fact_prompt_other_tokens"] = near(torch.cat(prompt_other))[0]
    imp_stats = {}
    for kind, pairs in zip(("same_surname", "same_first"), imp):
        ps = [chat_prompt(tok, as_subject(f, name).chat_question(), name) for name, f in pairs]
        ks, _ = capture_tokens(lm, ps, cb.layer)
        at = torch.stack([k[p.pos(tok)] for k, p in zip(ks, ps)])
        imp_stats[kind] = near(at)[0]
    report = {
        "other_tokens": {k: {"q": quantiles(v), "fire": fire_rates(v)} for k, v in cats.items()},
        "subject_tokens": {k: {"own_q": quantiles(v["own"]), "other_subject_q": quantiles(v["other_subject"]),
                               "nearest_is_own": round(float((v["own"] > v["other_subject"]).float().mean()), 4),
                               "own_fire": fire_rates(v["own"])}
                           for k, v in subj_stats.items()},
        "impostor_tokens": {k: {"q": quantiles(v), "fire": fire_rates(v)} for k, v in imp_stats.items()},
    }
    # τ: midway between the most similar non-subject token (perplexity text, locality
    # prompts, other tokens of the fact prompts) and the 5th percentile of held-out
    # subject mentions (paraphrases, mid-sentence); rounded to 0.01.
    lo = max(float(cats[k].max()) for k in cats)
    held = torch.cat([subj_stats["paraphrase"]["own"], subj_stats["mid_sentence"]["own"]])
    hi = float(held.quantile(0.05))
    tau = round((lo + hi) / 2, 2) if hi > lo else round(lo + 0.01, 2)
    report["tau_choice"] = {"max_other": round(lo, 4), "held_out_subject_p5": round(hi, 4), "tau": tau,
                            "separated": hi > lo}
    return report, {"tau": tau}


# --------------------------------------------------------------------------- runs


def memit_run(lm: LoadedModel, base: Baseline, subjects: list[list[Fact]], sizes: list[int], imp_for,
              record: Codebook | None, record_hidden: torch.Tensor | None) -> tuple[list[dict], dict | None]:
    """MEMIT alone with the product defaults, subject-aligned batches of ~5 facts.
    With `record`: at the first checkpoint, h_L − h_L(base) at the stored prompts' subject
    positions (option A)."""
    rows, option_a = [], None
    with tempfile.TemporaryDirectory() as home:
        mem = Memory(lm, home=home, config=MemoryConfig(progress=False), progress=False)
        mem.editor()
        t_inject, done, i = 0.0, 0, 0
        for n in sorted(sizes):
            while done < n:
                batch = []
                while i < len(subjects) and (not batch or len(batch) + len(subjects[i]) <= 5) and done + len(batch) < n:
                    batch += subjects[i]
                    i += 1
                t = time.perf_counter()
                mem.inject(batch)
                t_inject += time.perf_counter() - t
                done += len(batch)
            held = prefix(subjects, n)
            row = {"N": n, "method": "memit", "layer": "4-11", "tau": None, "inject_s": round(t_inject, 1),
                   **measure(lm, base, held, imp_for(held))}
            print(row, flush=True)
            rows.append(row)
            if record is not None and option_a is None:
                idx = subset(record, len(held))
                _, hid = capture_tokens(lm, [record.prompts[int(j)] for j in idx], None, record.layer)
                h = torch.stack([x[record.prompts[int(j)].pos(lm.tokenizer)] for x, j in zip(hid, idx)])
                option_a = {"n_facts": n, "idx": idx, "delta": h - record_hidden[idx]}
        mem.close()
    lm.reset_weights()
    return rows, option_a


def keyed_rows(lm, base, subjects, sizes, imp_for, cb: Codebook, values: torch.Tensor, taus: list[float],
               method: str) -> list[dict]:
    rows = []
    for n in sizes:
        held = prefix(subjects, n)
        idx = subset(cb, len(held))
        for tau in taus:
            km = KeyedMemory(lm, cb.layer, cb.keys[idx], values[idx], cb.owner[idx], tau)
            with km.on():
                m = measure(lm, base, held, imp_for(held), fire_counter=km)
            row = {"N": n, "method": method, "layer": cb.layer, "tau": tau, "entries": len(idx), **m}
            print(row, flush=True)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]
    floats = lambda s: [float(x) for x in s.split(",") if x]
    ap.add_argument("--seeds", type=ints, default=[1, 2])
    ap.add_argument("--sizes", type=ints, default=[40, 100], help="checkpoints for MEMIT and the keyed memory")
    ap.add_argument("--keyed-sizes", type=ints, default=None, help="checkpoints for the keyed memory (default --sizes)")
    ap.add_argument("--layers", type=ints, default=[11], help="layers of the keyed memory (v* at each)")
    ap.add_argument("--taus", type=floats, default=[], help="τ values measured besides the chosen one")
    ap.add_argument("--no-memit", action="store_true", help="skip the MEMIT baseline (and option A)")
    ap.add_argument("--cosines-only", action="store_true", help="only the codebook and cosine report per layer")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--name", default="keyed-probe")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keyed_sizes = sorted(args.keyed_sizes or args.sizes)
    t0 = time.perf_counter()
    lm = load_model(args.model, device=args.device, progress=False)
    base = None if args.cosines_only else Baseline(lm)
    print(f"model and baseline in {time.perf_counter() - t0:.0f} s", flush=True)
    ppl_text = perplexity_text()
    result: dict = {"runs": []}
    if base is not None:
        print(f"base ppl {base.ppl0:.4f}; locality known raw {len(base.raw_known)} chat {len(base.chat_known)}",
              flush=True)
        result |= {"ppl_base": base.ppl0, "raw_locality_facts": len(base.raw_known),
                   "chat_locality_facts": len(base.chat_known)}
    rows: list[dict] = []
    for seed in args.seeds:
        subjects = make_facts(sorted(set(args.sizes) | set(keyed_sizes)), seed)
        n_sub = {n: len(prefix(subjects, n)) for n in sorted(set(args.sizes) | set(keyed_sizes))}
        print(f"seed {seed}: subjects per checkpoint {n_sub}", flush=True)
        imp_all = impostors(subjects, seed)
        imp_for = lambda held: tuple(pairs[: len(held)] for pairs in imp_all)
        run: dict = {"seed": seed, "subjects": n_sub, "layers": {}}
        for layer in args.layers:
            t = time.perf_counter()
            cb = build_codebook(lm, subjects, layer)
            rep, choice = cosine_report(lm, cb, subjects, imp_all, text_keys(lm, ppl_text, layer))
            print(f"seed {seed} L{layer}: codebook of {len(cb.keys)} keys and cosines in "
                  f"{time.perf_counter() - t:.0f} s; tau choice {rep['tau_choice']}", flush=True)
            if args.cosines_only:
                run["layers"][layer] = {"cosines": rep}
                print_cosines(rep)
                continue
            t = time.perf_counter()
            deltas, vinfo = vstar_deltas(lm, subjects, layer)
            v_s = time.perf_counter() - t
            print(f"seed {seed} L{layer}: v* for {len(subjects)} subjects in {v_s:.0f} s", flush=True)
            taus = sorted({choice["tau"], *args.taus})
            new = keyed_rows(lm, base, subjects, keyed_sizes, imp_for, cb, deltas[cb.owner], taus, "keyed-vstar")
            for r in new:
                r["seed"] = seed
            rows += new
            run["layers"][layer] = {"cosines": rep, "vstar": {**vinfo, "seconds": round(v_s, 1)},
                                    "delta_norm_mean": round(float(deltas.norm(dim=-1).mean()), 3)}
            if layer == 11 and not args.no_memit:
                _, hid = capture_tokens(lm, cb.prompts, None, layer)
                base_h = torch.stack([x[p.pos(lm.tokenizer)] for x, p in zip(hid, cb.prompts)])
                mrows, opt_a = memit_run(lm, base, subjects, args.sizes, imp_for, cb, base_h)
                for r in mrows:
                    r["seed"] = seed
                rows += mrows
                if opt_a is not None:
                    n = opt_a["n_facts"]
                    vals = torch.zeros(len(cb.keys), opt_a["delta"].shape[1], device=lm.device)
                    vals[opt_a["idx"]] = opt_a["delta"]
                    new = keyed_rows(lm, base, subjects, [n], imp_for, cb, vals, taus, "keyed-memit-delta")
                    for r in new:
                        r["seed"] = seed
                    rows += new
                    run["layers"][layer]["option_a_delta_vs_vstar_cos"] = quantiles(F.cosine_similarity(
                        opt_a["delta"], deltas[cb.owner[opt_a["idx"]]], dim=-1))
        result["runs"].append(run)
        print(f"seed {seed} done at {time.perf_counter() - t0:.0f} s", flush=True)
    result["rows"] = rows
    result["seconds"] = round(time.perf_counter() - t0, 1)
    save(args.name, result)
    print_table(rows)


def print_cosines(rep: dict) -> None:
    for group in ("other_tokens", "impostor_tokens"):
        for k, v in rep[group].items():
            q = v["q"]
            print(f"  {k:28s} p50 {q['p50']:.3f} p99 {q['p99']:.3f} max {q['max']:.3f}")
    for k, v in rep["subject_tokens"].items():
        q, o = v["own_q"], v["other_subject_q"]
        print(f"  subject {k:20s} own min {q['min']:.3f} p5 {q['p5']:.3f} p50 {q['p50']:.3f} | other subject "
              f"p50 {o['p50']:.3f} max {o['max']:.3f} | nearest is own {v['nearest_is_own']}")


def print_table(rows: list[dict]) -> None:
    cols = ["N", "seed", "method", "layer", "tau", "raw", "chat", "para", "mid", "ppl_change_pct", "locality",
            "chat_locality", "unchanged_raw", "unchanged_chat", "false_fire_ppl", "impostor_same_surname_recall",
            "impostor_same_first_recall"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))


if __name__ == "__main__":
    main()
