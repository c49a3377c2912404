"""Training pairs for sleep: facts as questions and answers, and their token ids.

A fact becomes several pairs (paper §3.3): its own chat question and a few ways of
asking it, plus the raw completion, so that both pathways — chat and raw text — hold
the fact once its MEMIT edit is gone. Answers have the form MEMIT wrote ("Lisbon."):
the sleep starts from the MEMIT edits (see ``sleep.cycle``), and training towards
another form ("Anselm Kreutzer lives in Lisbon.") first unlearned the answer that
was there (chat recall 1.0 → 0.1–0.6 on 10 facts, BENCHMARKS.md).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sleepwake.corpus import locality_facts, world_facts
from sleepwake.facts import Fact
from sleepwake.inference import chat_answer, chat_text, encode, encode_target, raw_prompt, with_stop
from sleepwake.sleep.lora import Example

# Ways of asking a fact's question. "{q}" is the question.
_ASKINGS = ("{q}", "Quick question: {q}", "Do you know this? {q}", "{q} Answer briefly.")


@dataclass(frozen=True)
class Pair:
    """One training pair, as text: `chat` pairs go through the chat template."""

    prompt: str
    answer: str
    chat: bool
    fact_id: int | None = None  # the fact it teaches (None for dreams and replayed chat)
    source: str = "fact"  # "fact" | "dream" | "conversation"

    def example(self, tokenizer: Any) -> Example:
        if self.chat:
            text = chat_text(tokenizer, self.prompt)
            target = chat_answer(tokenizer, self.answer)
        else:
            text, target = self.prompt, with_stop(self.answer)
        return Example(tuple(encode(tokenizer, text, chat=self.chat)),
                       tuple(encode_target(tokenizer, text, target, chat=self.chat)))


def fact_pairs(fact: Fact, tokenizer: Any, fact_id: int | None = None) -> list[Pair]:
    """The pairs that teach one fact (its raw one as MEMIT writes it, `raw_prompt`)."""
    q = fact.chat_question()
    pairs = [Pair(a.format(q=q), fact.object, True, fact_id) for a in _ASKINGS]
    pairs.append(Pair(raw_prompt(tokenizer, fact), fact.target, False, fact_id))
    return pairs


def dream_questions(n: int, seed: int, own: Sequence[Fact] = ()) -> list[str]:
    """Questions for the model to answer itself before a deep sleep ("dreaming"): about
    its consolidated facts and about the world. World questions come from the facts
    that are *not* the locality benchmark's, so the benchmark stays a fair test."""
    held_out = {f.key for f in locality_facts()}
    world = [f.chat_question() for f in world_facts() if f.key not in held_out]
    random.Random(seed).shuffle(world)
    mine = [f.chat_question() for f in own][: n // 2]
    return mine + world[: n - len(mine)]


def examples(pairs: Sequence[Pair], tokenizer: Any) -> list[Example]:
    return [p.example(tokenizer) for p in pairs]
