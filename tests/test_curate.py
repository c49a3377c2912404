"""Curation of conversation exchanges for deep sleep (paper §3.4, stage 1): scores and thresholds."""

from __future__ import annotations

import pytest

from sleepwake.config import CurationConfig
from sleepwake.sleep.curate import curate, pairs
from sleepwake.store import Exchange

CFG = CurationConfig()
REPLY = "Porto is a beautiful city on the Douro river, famous for its bridges."


def ex(i: int, user: str, reply: str = REPLY, n_facts: int = 0) -> Exchange:
    return Exchange(i, user, reply, n_facts)


def test_an_exchange_that_tells_facts_with_a_real_reply_is_kept():
    (s,) = curate([ex(1, "My sister Ana lives in Porto.", n_facts=2)], [], CFG)
    assert s.kept and s.importance == 1.0 and s.novelty == 1.0 and s.utility > 0.5
    assert pairs([s])[0].prompt == "My sister Ana lives in Porto." and pairs([s])[0].source == "conversation"


@pytest.mark.parametrize("bad, low", [
    (ex(2, "What is the capital of Peru?"), "importance"),  # a question tells nothing
    (ex(3, "hi", n_facts=0), "importance"),  # small talk
    (ex(4, "I live in Lima.", reply="", n_facts=1), "utility"),  # nothing to learn as an answer
    (ex(5, "I live in Lima.", reply="You live in Lima.", n_facts=1), "utility"),  # parroted
])
def test_exchanges_below_a_threshold_are_dropped(bad, low):
    (s,) = curate([bad], [], CFG)
    assert not s.kept and getattr(s, low) < getattr(CFG, f"min_{low}")


def test_repeats_are_not_novel_against_earlier_and_the_same_batch():
    told = "My sister Ana lives in Porto."
    first, again = curate([ex(1, told, n_facts=1), ex(2, told + "!", n_facts=1)], [], CFG)
    assert first.kept and not again.kept and again.novelty == 0.0
    (later,) = curate([ex(3, told, n_facts=1)], [told], CFG)  # curated by an earlier sleep
    assert not later.kept


def test_only_the_best_max_exchanges_are_kept():
    people = ["Ana Porto", "Bruno Lima", "Chiara Turin", "Dmitri Omsk", "Eva Graz", "Femi Lagos", "Goran Split",
              "Hana Brno", "Ivo Zadar", "Jun Osaka"]
    many = [ex(i, f"My friend {p.split()[0]} lives in {p.split()[1]}.", n_facts=1 + i % 3) for i, p in enumerate(people)]
    scored = curate(many, [], CurationConfig(max_exchanges=3))
    kept = [s for s in scored if s.kept]
    assert len(scored) == 10 and len(kept) == 3
    assert min(s.score for s in kept) >= max(s.score for s in scored if not s.kept)


def test_thresholds_are_validated():
    with pytest.raises(ValueError, match="thresholds"):
        CurationConfig(min_novelty=1.5)
