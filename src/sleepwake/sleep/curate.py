"""Curation (paper §3.4, stage 1): which conversation exchanges a deep sleep learns from.

Each exchange (a user message and the reply to it) is scored in [0, 1] on
- novelty: how little its words overlap those of exchanges already curated or
  scored before it (a repeated message teaches nothing new),
- importance: how much the user told — facts extracted from the message count most;
  a question or small talk counts little,
- utility: whether the reply is worth learning as an answer — empty, very short or
  parroted replies are not;
and kept only if it reaches every threshold (`CurationConfig`). Kept exchanges
become chat training pairs beside the facts' own pairs, and are stored for replay.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from sleepwake.config import CurationConfig
from sleepwake.sleep.data import Pair
from sleepwake.store import Exchange

_WORD = re.compile(r"\w+", re.UNICODE)
_STOP = frozenset(["a", "an", "the", "and", "or", "but", "if", "of", "to", "in", "on", "at", "for", "with", "from", "by", "as", "is", "are", "was", "were", "be", "been", "am", "i", "me", "my", "we", "our", "you", "your", "he", "she", "it", "they", "them", "his", "her", "its", "their", "this", "that", "these", "those", "do", "does", "did", "have", "has", "had", "so", "not", "no", "yes", "just", "really", "very", "too", "also", "what", "who", "where", "when", "why", "how", "which", "can", "could", "would", "should", "will", "shall", "may", "might"])


@dataclass(frozen=True)
class Scored:
    exchange: Exchange
    novelty: float
    importance: float
    utility: float
    kept: bool

    @property
    def score(self) -> float:
        return (self.novelty + self.importance + self.utility) / 3


def content_words(text: str) -> frozenset[str]:
    return frozenset(w for w in _WORD.findall(text.casefold()) if w not in _STOP)


def _overlap(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0


def importance(exchange: Exchange) -> float:
    if exchange.n_facts:
        return min(1.0, 0.5 + 0.25 * exchange.n_facts)
    question = exchange.user.rstrip().endswith("?")
    return 0.1 if question else min(0.4, 0.05 * len(content_words(exchange.user)))


def utility(exchange: Exchange) -> float:
    reply = content_words(exchange.reply)
    if not reply:
        return 0.0
    parroted = len(reply & content_words(exchange.user)) / len(reply)
    return min(1.0, len(reply) / 8) * (1.0 - parroted)


def curate(exchanges: Sequence[Exchange], earlier: Sequence[str], cfg: CurationConfig) -> list[Scored]:
    """Score every exchange; the best `cfg.max_exchanges` that pass all thresholds are kept."""
    seen = [content_words(t) for t in earlier]
    scored = []
    for ex in exchanges:
        words = content_words(ex.user)
        novelty = 1.0 - max((_overlap(words, s) for s in seen), default=0.0) if words else 0.0
        seen.append(words)
        imp, use = importance(ex), utility(ex)
        ok = novelty >= cfg.min_novelty and imp >= cfg.min_importance and use >= cfg.min_utility
        scored.append(Scored(ex, novelty, imp, use, ok))
    best = sorted((s for s in scored if s.kept), key=lambda s: -s.score)[: cfg.max_exchanges]
    chosen = {id(s) for s in best}
    return [s if id(s) in chosen else Scored(s.exchange, s.novelty, s.importance, s.utility, False) for s in scored]


def pairs(scored: Sequence[Scored]) -> list[Pair]:
    """The kept exchanges as chat training pairs."""
    return [Pair(s.exchange.user, s.exchange.reply.strip(), True, None, "conversation") for s in scored if s.kept]
