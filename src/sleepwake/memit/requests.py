"""Edit requests: the token sequences MEMIT writes, and the slots where it writes.

One fact becomes one or two requests: the raw completion prompt ("Anselm Kreutzer
lives in" → " Lisbon") and, with `chat_edit`, the chat-formatted question (→
"Lisbon"). Each request has one *slot* per position whose next-token prediction
is edited: the last prompt token, and with key_positions="target" also every
target token but the last, so a multi-token object is written whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from sleepwake.config import MemitConfig
from sleepwake.facts import Fact
from sleepwake.inference import chat_text, encode, encode_target


@dataclass(frozen=True)
class EditRequest:
    fact_index: int  # index into the batch of facts
    ids: tuple[int, ...]  # prompt + target, the sequence fed to the model
    prompt_len: int
    kl_ids: tuple[int, ...]  # neutral prompt "{subject} is a" for the KL term
    kind: str  # "raw" | "chat"

    @property
    def target(self) -> tuple[int, ...]:
        return self.ids[self.prompt_len:]


def build_requests(facts: Sequence[Fact], tokenizer: Any, cfg: MemitConfig) -> list[EditRequest]:
    out: list[EditRequest] = []
    for i, fact in enumerate(facts):
        kl = tuple(encode(tokenizer, f"{fact.subject} is a"))
        p = encode(tokenizer, fact.prompt)
        t = encode_target(tokenizer, fact.prompt, fact.target)
        out.append(EditRequest(i, tuple(p + t), len(p), kl, "raw"))
        if cfg.chat_edit:
            text = chat_text(tokenizer, fact.chat_question())
            p = encode(tokenizer, text, chat=True)
            t = encode_target(tokenizer, text, fact.object, chat=True)
            out.append(EditRequest(i, tuple(p + t), len(p), kl, "chat"))
    return out


def slot_positions(req: EditRequest, cfg: MemitConfig) -> list[int]:
    """Positions in `req.ids` whose hidden state is edited (each predicts one target token)."""
    last = req.prompt_len - 1
    if cfg.key_positions == "last":
        return [last]
    return list(range(last, len(req.ids) - 1))
