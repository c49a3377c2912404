"""20 subjects × 3 relations on the real default model (issue #2: a user has many attributes).

In a file of its own so that the test workers (`make test` runs two) can give this,
the longest test, one worker while the other takes the rest.
"""

from __future__ import annotations

import pytest

from sleepwake.synthetic import fictional_facts

pytestmark = pytest.mark.slow


def test_many_facts_about_each_subject(make_memory):
    """20 subjects × 3 relations, injected over several batches.

    A subject's three facts share one edit (keys at the subject), written in one batch,
    and its δ gets twice the v* steps (`memit.targets.step_budget`), which lets every
    batch reach the early stop. 60 facts are past `MemitConfig.chat_edit_max_facts`
    (40): the batch that goes past it edits the 30 facts held again raw-only, so these
    facts reach chat questions only after a nap, and raw recall is what is checked.
    Measured on these facts: raw recall 0.983, 19 of 20 subjects complete (bf16 steps on
    two threads). With chat edits for all 60 (sessions 2–17): raw 0.967 / 0.967 / 1.0,
    18 / 18 / 20 subjects complete. The issue asks for all 60.
    """
    from sleepwake.config import MemoryConfig

    mem = make_memory(config=MemoryConfig(progress=False, batch_size=15))
    facts = fictional_facts(20, 3, seed=1)
    res = mem.inject(facts)
    assert [st.raw_only_again for st in res.stats] == [0, 0, 30, 0]
    report = mem.evaluate(facts)
    missed = [(f.subject, f.relation, f.object, f.raw_completion) for f in report.facts if not f.raw_ok]
    assert report.raw_recall >= 0.95, missed
    by_subject: dict[str, int] = {}
    for f in report.facts:
        by_subject[f.subject] = by_subject.get(f.subject, 0) + f.raw_ok
    complete = sum(v == 3 for v in by_subject.values())
    print(f"20x3: raw {report.raw_recall:.3f}, chat {report.chat_recall:.3f}, "
          f"{complete} subjects with all three, perplexity {report.ppl:.2f}")
    assert complete >= 17, missed  # most subjects keep all three facts
