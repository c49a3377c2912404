"""Texts and fact sets the project ships in `sleepwake/data` (written for it; nothing is fetched)."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib.resources import files

from sleepwake.facts import Fact


def _read(name: str) -> str:
    return files("sleepwake").joinpath("data", name).read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def reference_texts() -> tuple[str, ...]:
    """Diverse texts for the covariance Ĉ (eq. 2)."""
    return tuple(json.loads(line)["text"] for line in _read("reference_texts.jsonl").splitlines() if line.strip())


def reference_digest() -> str:
    return hashlib.sha256(_read("reference_texts.jsonl").encode()).hexdigest()[:16]


@lru_cache(maxsize=None)
def perplexity_text() -> str:
    """A fixed text, disjoint from the reference texts, for perplexity."""
    return _read("perplexity_text.txt")


def world_facts() -> list[Fact]:
    """Candidate real-world facts with questions (locality_facts is the subset the model knows)."""
    return [Fact.from_dict(json.loads(line)) for line in _read("world_facts.jsonl").splitlines() if line.strip()]


def gate_candidates() -> list[Fact]:
    """More real-world facts, of kinds the other sets lack, for the budget's locality gate
    alone (`MemoryBase.gate_facts` keeps those the base model completes). The other sets'
    facts a small model knows are nearly all in `locality_facts`, which the gate leaves to
    the benchmark: without these the default model's gate held one fact."""
    return [Fact.from_dict(json.loads(line)) for line in _read("gate_facts.jsonl").splitlines() if line.strip()]


def locality_facts() -> list[Fact]:
    """Real-world facts the unedited default model completes correctly."""
    return [Fact.from_dict(json.loads(line)) for line in _read("locality_facts.jsonl").splitlines() if line.strip()]
