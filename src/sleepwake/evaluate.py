"""How well the model knows a set of facts, and how much editing cost it.

- raw recall: the greedy completion of ``subject relation`` contains the object;
- chat recall: the answer to the fact's question, asked through the chat template,
  contains the object;
- perplexity on a fixed reference text (coherence);
- locality: the share of real-world facts the model still completes correctly.

Generation for a check stops once the object is named (the check's result is the
same), so a stored completion ends there: "Lisbon." rather than a whole paragraph.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sleepwake.facts import Fact, mentions, runs_on
from sleepwake.inference import (chat_text, encode, encode_target, generate, head_logits, pad_right, raw_prompt,
                                 rows_per_pass, shared_prefix)
from sleepwake.models import LoadedModel
from sleepwake.placement import input_device
from sleepwake.store import write_atomic


@dataclass
class FactResult:
    subject: str
    relation: str
    object: str
    question: str
    raw_completion: str
    raw_ok: bool
    chat_answer: str
    chat_ok: bool


@dataclass
class EvalReport:
    n: int
    raw_recall: float
    chat_recall: float
    ppl: float | None  # None: not measured
    facts: list[FactResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def raw_completions(model: Any, tok: Any, facts: Sequence[Fact], max_new_tokens: int = 16) -> list[str]:
    """Greedy completions of the facts' prompts, each ended once it names its object."""
    prompts = [encode(tok, raw_prompt(tok, f)) for f in facts]
    return generate(model, tok, prompts, max_new_tokens=max_new_tokens, until=[f.object for f in facts])


def chat_answers(model: Any, tok: Any, facts: Sequence[Fact], max_new_tokens: int = 24) -> list[str]:
    """Greedy chat answers to the facts' questions, each ended once it names its object."""
    prompts = [encode(tok, chat_text(tok, f.chat_question()), chat=True) for f in facts]
    return generate(model, tok, prompts, max_new_tokens=max_new_tokens, until=[f.object for f in facts])


def recall(answers: Sequence[str], facts: Sequence[Fact]) -> float:
    if not facts:
        return float("nan")
    return sum(mentions(a, f.object) for a, f in zip(answers, facts)) / len(facts)


@torch.no_grad()
def held(model: Any, tok: Any, facts: Sequence[Fact], chat: bool = True, rows: int | None = None) -> list[bool]:
    """Whether greedy decoding would write each fact's object right after its prompt
    (and, with `chat`, right after its chat question): every object token is the
    model's top prediction, and the next one does not run on into a longer word, read
    in one teacher-forced pass.

    A cheap stand-in for raw and chat recall (a forward pass per `rows` sequences
    instead of a generation), strict in one way: an answer that names the object
    later ("He lives in Lisbon") counts as not held. `rows`: by default `rows_per_pass`."""
    rows = rows or rows_per_pass(input_device(model))
    return checked(tok, facts, chat, rows, lambda seqs: _object_is_top(model, tok, seqs))


TopReader = Callable[[list[tuple[list[int], int]]], list[tuple[bool, int]]]
"""One teacher-forced pass over (ids, prompt length) rows: per row, whether every token
after the prompt is the top prediction, and the top token after the last one."""


def checked(tok: Any, facts: Sequence[Fact], chat: bool, rows: int, read: TopReader) -> list[bool]:
    """`held` on any backend, `read` being its teacher-forced pass, `rows` rows at a time."""
    ok = [True] * len(facts)
    for form in _check_forms(tok, facts, chat):
        for s in range(0, len(form), rows):
            part = form[s : s + rows]
            for (i, ids, _, obj), (good, after) in zip(part, read([(ids, n) for _, ids, n, _ in part])):
                ok[i] = ok[i] and answered(tok, obj, good, ids, after)
    return ok


def _check_forms(tok: Any, facts: Sequence[Fact], chat: bool) -> list[list[tuple[int, list[int], int, str]]]:
    """The sequences `held` reads, per prompt form: (fact index, prompt + object ids,
    prompt length, object as written there)."""
    forms = [[(i, raw_prompt(tok, f), f.target, False) for i, f in enumerate(facts)]]
    if chat:
        forms.append([(i, chat_text(tok, f.chat_question()), f.object, True) for i, f in enumerate(facts)])
    out = []
    for form in forms:
        seqs = []
        for i, text, target, is_chat in form:
            p = encode(tok, text, chat=is_chat)
            seqs.append((i, p + encode_target(tok, text, target, chat=is_chat), len(p), target))
        out.append(seqs)
    return out


def answered(tok: Any, obj: str, every_token_top: bool, ids: Sequence[int], after: int) -> bool:
    """A fact's object (the end of `ids`) is answered where each of its tokens is the top
    prediction and the top token after it (`after`) does not glue more letters on: a sleep
    that loses the taught full stop can leave "Tomasz Wielgoszlia", which names no one.

    `after` is decoded after the object's last token, not alone: a SentencePiece decoder
    drops the leading space of a text's first token (" in" alone reads "in")."""
    if not every_token_top:
        return False
    last = tok.decode(ids[-1:])
    return not runs_on(obj, tok.decode([*ids[-1:], after])[len(last):])


def _object_is_top(model: Any, tok: Any, seqs: Sequence[tuple[list[int], int]]) -> list[tuple[bool, int]]:
    """For each (ids, prompt length): is every token after the prompt the top prediction,
    and which token is top after the last one?

    The prefix all sequences share (a chat template's system turn) runs once; the
    rest runs right-padded after it, which causal attention keeps from the real tokens."""
    device = input_device(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    # The position before the first object token is re-run.
    shared, extra = shared_prefix(model, [ids for ids, _ in seqs], min(n for _, n in seqs) - 1)
    batch = pad_right([ids[shared:] for ids, _ in seqs], pad, device)["input_ids"]
    hidden = model.get_decoder()(input_ids=batch, use_cache=False, **extra).last_hidden_state
    r = [j for j, (ids, n) in enumerate(seqs) for _ in range(n, len(ids))]
    c = [t - 1 - shared for ids, n in seqs for t in range(n, len(ids))]
    want = torch.tensor([ids[t] for ids, n in seqs for t in range(n, len(ids))])
    ends = [len(ids) - 1 - shared for ids, _ in seqs]  # where the token after the object is predicted
    top = head_logits(model, hidden[r + list(range(len(seqs))), c + ends]).argmax(-1).cpu()
    ok = [True] * len(seqs)
    for h, j in zip((top[: len(r)] == want).tolist(), r):
        ok[j] = ok[j] and h
    return list(zip(ok, top[len(r):].tolist()))


@torch.no_grad()
def perplexity(model: Any, tok: Any, text: str, window: int = 512, rows: int = 128) -> float:
    """Token-level perplexity of `text`, in non-overlapping windows.

    The LM head runs on `rows` positions at a time into a fused cross-entropy: all of a
    window's log-probabilities at once were 0.5 GB for Gemma-3's 262k-token vocabulary,
    and a call took 14 s instead of 10 s on one thread."""
    device = input_device(model)
    ids = encode(tok, text)
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor(ids[start : start + window + 1], device=device)
        if len(chunk) < 2:
            break
        hidden = model.get_decoder()(input_ids=chunk[None, :-1], use_cache=False).last_hidden_state[0]
        tgt = chunk[1:]
        for s in range(0, len(tgt), rows):
            logits = head_logits(model, hidden[s : s + rows])
            nll += F.cross_entropy(logits, tgt[s : s + rows].to(logits.device), reduction="sum").item()
        count += len(tgt)
    return math.exp(nll / count)


def perplexity_cache_path(lm: LoadedModel, text: str, cache_dir: Path) -> Path:
    """Where `cached_perplexity` keeps the perplexity of the live weights on `text`."""
    return weights_cache_path(f"{lm.weights_digest()}|{lm.device.type}|", text, cache_dir)


def weights_cache_path(weights: str, text: str, cache_dir: Path) -> Path:
    """Where the perplexity on `text` of the weights named `weights` is kept (any backend)."""
    key = hashlib.blake2b(weights.encode() + text.encode(), digest_size=16).hexdigest()
    return cache_dir / "perplexity" / f"{key}.json"


def cached_perplexity(lm: LoadedModel, text: str, cache_dir: Path) -> float:
    """`perplexity` of the live weights, kept on disk under `cache_dir` by what it depends
    on: the weights (`LoadedModel.weights_digest`), the text and the device type. A new
    process, or another home with the same weights (the base model's, most often),
    reads it instead of spending ~5 s (SmolLM2, one thread) to ~10 s (Gemma-3) again.
    Different thread counts can change the last digits: the first measurement is kept.
    On a GPU it measures instead: naming 8B-shape weights meant copying ~1 GB of edited
    layers to the host and hashing them, which took longer than the measurement."""
    if lm.device.type != "cpu":
        return perplexity(lm.model, lm.tokenizer, text)
    return kept_on_disk(perplexity_cache_path(lm, text, cache_dir), lambda: perplexity(lm.model, lm.tokenizer, text))


def kept_on_disk(path: Path, measure: Callable[[], float]) -> float:
    """The perplexity stored at `path`, or `measure()`'s, stored there first."""
    try:
        return float(json.loads(path.read_text(encoding="utf-8"))["ppl"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not measured yet, or a damaged file: measure again
    ppl = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps({"ppl": repr(ppl)}), encoding="utf-8"))
    return ppl


def evaluate_facts(
    model: Any,
    tok: Any,
    facts: Sequence[Fact],
    ppl_text: str | None,
    *,
    batch: int = 16,
    progress: bool = True,
    max_new_tokens: int = 16,
) -> EvalReport:
    raw: list[str] = []
    chat: list[str] = []
    bar = tqdm(total=len(facts), desc="evaluate", unit="fact", disable=not progress)
    for s in range(0, len(facts), batch):
        chunk = facts[s : s + batch]
        raw += raw_completions(model, tok, chunk, max_new_tokens)
        chat += chat_answers(model, tok, chunk, max_new_tokens)
        bar.update(len(chunk))
    bar.close()
    results = [
        FactResult(f.subject, f.relation, f.object, f.chat_question(), r, mentions(r, f.object), c,
                   mentions(c, f.object))
        for f, r, c in zip(facts, raw, chat)
    ]
    n = len(facts)
    return EvalReport(
        n=n,
        raw_recall=sum(r.raw_ok for r in results) / n if n else float("nan"),
        chat_recall=sum(r.chat_ok for r in results) / n if n else float("nan"),
        ppl=None if ppl_text is None else perplexity(model, tok, ppl_text),
        facts=results,
    )
