"""Lifelong memory (issue #25) on the real default model, kept short: a hundred facts
about invented people, told shuffled, through the naps and the deep sleep that the
sleep pressure brings on by itself, then a new `Memory` on the same home.

Injecting a hundred facts takes MEMIT about six minutes on this project's two CPU cores,
and the sleeps as long again: too long for `make test`, so it runs with `make lifelong`
(marker `lifelong`)."""

from __future__ import annotations

import pytest

from sleepwake.config import MemoryConfig, PressureConfig
from sleepwake.evaluate import evaluate_facts
from sleepwake.synthetic import lifelong_facts

FACTS = lifelong_facts(100, seed=11)
pytestmark = pytest.mark.lifelong


@pytest.fixture(scope="module")
def lived(tmp_path_factory, lm, cache_dir):
    """The hundred facts, ten at a time, with auto sleep on. The pressure's edit scale is
    halved (a nap at about 17 held facts instead of 33) so that a hundred facts bring
    several naps, and then a deep sleep, as a few hundred would with the defaults."""
    from sleepwake.memory import Memory

    home = tmp_path_factory.mktemp("lifelong") / "home"
    cfg = MemoryConfig(progress=False, auto_sleep=True, pressure=PressureConfig(max_edits=25, naps_per_deep=2))
    with Memory(lm, home=home, config=cfg, cache_dir=cache_dir, progress=False) as mem:
        for i in range(0, len(FACTS), 10):
            mem.inject(FACTS[i:i + 10])
        history = mem.history()
    return home, cfg, history


def test_a_hundred_facts_through_naps_and_a_deep_sleep_survive_a_restart(lived, make_memory):
    home, cfg, history = lived
    done = [(c["kind"], c["status"]) for c in history]
    assert ("nap", "accepted") in done and ("deep", "accepted") in done, done
    mem = make_memory(home, cfg)
    where = [r.where for r in mem.facts()]
    assert where.count("consolidated") >= 70, where  # most of the memory has left MEMIT
    report = evaluate_facts(mem.model, mem.tokenizer, FACTS, None, progress=False)
    assert report.raw_recall >= 0.95 and report.chat_recall >= 0.9, (report.raw_recall, report.chat_recall)
    budget = cfg.budget
    assert mem.locality() >= budget.min_locality
    assert mem.perplexity() <= mem.base_perplexity() * (1 + budget.max_ppl_increase)
