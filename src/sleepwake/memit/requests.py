"""Edit requests: the token sequences MEMIT writes, and the slots where it writes.

One fact becomes one or two requests: the raw completion prompt ("Anselm Kreutzer
lives in" → " Lisbon") and, with `chat_edit`, the chat-formatted question (→
"Lisbon"). Each request has *slots*: the positions whose hidden state is edited.

- key_positions="subject" (default): one slot at the subject's last token, as in
  the original MEMIT. All requests about one subject in a batch share one δ, so
  the subject's edit carries every fact known about it, and any prompt that
  mentions the subject (a chat question, a paraphrase) can read it.
- "last": the last prompt token; "target": that and every target token but the
  last (the relation-token keys of the paper's code; they collide across subjects).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from sleepwake.config import MemitConfig
from sleepwake.facts import Fact
from sleepwake.inference import chat_answer, chat_text, encode, encode_target, lead_in, raw_prompt, with_stop


@dataclass(frozen=True)
class EditRequest:
    fact_index: int  # index into the batch of facts
    subject: str  # Fact.subject_key; requests about one subject share a δ in "subject" mode
    ids: tuple[int, ...]  # prompt + target, the sequence fed to the model
    prompt_len: int
    kl_ids: tuple[int, ...]  # neutral prompt "{subject} is a" for the KL term
    kind: str  # "raw" | "chat"
    subject_pos: int  # last token of the subject in `ids` (last prompt token if absent)
    kl_subject_pos: int  # the same in `kl_ids`
    head_pos: int | None = None  # last token of the subject's words but the last ("Anna" of "Anna Berg")

    @property
    def target(self) -> tuple[int, ...]:
        return self.ids[self.prompt_len:]


def _last_token_in(tokenizer: Any, text: str, start: int, end: int, chat: bool) -> int | None:
    enc = tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True)
    hits = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
    return hits[-1] if hits else None


def last_token_of(tokenizer: Any, text: str, span: str, *, chat: bool = False) -> int | None:
    """Index of the last token overlapping the last occurrence of `span` in `text`
    (case-insensitive), in the ids `encode(tokenizer, text, chat=chat)`; None if absent."""
    start = text.casefold().rfind(span.casefold())
    return None if start < 0 else _last_token_in(tokenizer, text, start, start + len(span), chat)


def head_token_of(tokenizer: Any, text: str, span: str, *, chat: bool = False) -> int | None:
    """Like `last_token_of`, for the last token of `span`'s words but its last one ("Anna"
    of "Anna Berg"); None for a one-word span. The keyed memory checks the key there too:
    at the surname alone "Lars Berg" reads like "Anna Berg" (cosine up to 0.99)."""
    words = span.strip().rsplit(None, 1)
    start = text.casefold().rfind(span.casefold())
    if len(words) < 2 or start < 0:
        return None
    head = _last_token_in(tokenizer, text, start, start + span.find(words[0]) + len(words[0]), chat)
    last = _last_token_in(tokenizer, text, start, start + len(span), chat)
    return head if head is not None and last is not None and head < last else None


def build_requests(facts: Sequence[Fact], tokenizer: Any, cfg: MemitConfig) -> list[EditRequest]:
    out: list[EditRequest] = []
    for i, fact in enumerate(facts):
        kl_text = lead_in(tokenizer, f"{fact.subject} is a", fact.subject)
        kl = tuple(encode(tokenizer, kl_text))
        kl_pos = last_token_of(tokenizer, kl_text, fact.subject)
        kl_pos = len(kl) - 1 if kl_pos is None else kl_pos
        texts = [(raw_prompt(tokenizer, fact), with_stop(fact.target), False, "raw")]
        if cfg.chat_edit:
            texts.append((chat_text(tokenizer, fact.chat_question()), chat_answer(tokenizer, fact.object), True, "chat"))
        for text, target, chat, kind in texts:
            p = encode(tokenizer, text, chat=chat)
            t = encode_target(tokenizer, text, target, chat=chat)
            pos = last_token_of(tokenizer, text, fact.subject, chat=chat)
            head = head_token_of(tokenizer, text, fact.subject, chat=chat) if pos is not None and pos < len(p) else None
            pos = len(p) - 1 if pos is None or pos >= len(p) else pos
            out.append(EditRequest(i, fact.subject_key, tuple(p + t), len(p), kl, kind, pos, kl_pos, head))
    return out


def slot_positions(req: EditRequest, cfg: MemitConfig) -> list[int]:
    """Positions in `req.ids` whose hidden state is edited (each predicts one target token)."""
    last = req.prompt_len - 1
    if cfg.key_positions == "subject":
        return [req.subject_pos]
    if cfg.key_positions == "last":
        return [last]
    return list(range(last, len(req.ids) - 1))
