"""20 subjects × 3 relations on the real default model (issue #2: a user has many attributes).

In a file of its own so that the test workers (`make test` runs two) can give this,
the longest test, one worker while the other takes the rest.
"""

from __future__ import annotations

import pytest

from sleepwake.facts import mentions
from sleepwake.synthetic import fictional_facts

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("subjects, batch, min_raw, min_complete", [
    pytest.param(20, 15, 0.95, 17, marks=pytest.mark.lifelong, id="20x3"),  # ~100 s here: `make lifelong`
    pytest.param(9, 9, 0.92, 7, marks=pytest.mark.extended, id="9x3"),  # the same at half the cost: `make test-extended`
])
def test_many_facts_about_each_subject(make_memory, subjects, batch, min_raw, min_complete):
    """20 subjects × 3 relations, injected over several batches (in `make test`, 9 × 3 in
    batches of 9 with the limit at 9: the same sequence of a chat-edited batch, one past
    the limit that edits the held facts again raw-only, then raw-only ones; measured
    there: raw 0.963, 8 of 9 subjects complete).

    A subject's three facts share one edit (keys at the subject), written in one batch,
    and its δ gets twice the v* steps (`memit.targets.step_budget`), which lets every
    batch reach the early stop. The chat-edit limit (`MemitConfig.chat_edit_max_facts`,
    40 by default) is set to 15 here: the second batch goes past it and first edits the
    15 facts held again raw-only, as the default limit does at the third batch (30
    facts), with one chat-edited batch fewer to pay for (chat edits are the dearer
    ones; 285 s of the test's time before). The facts past the limit reach chat
    questions only after a nap, so raw recall is what is checked, on the raw prompts
    alone (the chat half of `Memory.evaluate` measured 0.000 here and was no test).
    Measured with the default limit: raw recall 0.983, 19 of 20 subjects complete (bf16
    steps on two threads). With chat edits for all 60 (sessions 2–17): raw 0.967 / 0.967
    / 1.0, 18 / 18 / 20 subjects complete. The issue asks for all 60.
    """
    from sleepwake.config import MemoryConfig
    from sleepwake.evaluate import raw_completions

    mem = make_memory(config=MemoryConfig(progress=False, batch_size=batch).with_memit(chat_edit_max_facts=batch))
    facts = fictional_facts(subjects, 3, seed=1)
    res = mem.inject(facts)
    n_batches = -(-len(facts) // batch)
    assert [st.raw_only_again for st in res.stats] == [0, batch] + [0] * (n_batches - 2)
    assert [st.chat for st in res.stats] == [True] + [False] * (n_batches - 1)
    for st in res.stats:
        print(f"batch: {st.seconds:.1f} s (v* {st.v_seconds:.1f} s, {st.v_steps} steps), chat {st.chat}, "
              f"{st.raw_only_again} again raw-only, {st.knocked_out} knocked out")
    completions = raw_completions(mem.model, mem.tokenizer, facts, 16)  # as `Memory.evaluate` reads them
    ok = [mentions(c, f.object) for f, c in zip(facts, completions)]
    missed = [(f.subject, f.relation, f.object, c) for f, c, good in zip(facts, completions, ok) if not good]
    raw_recall = sum(ok) / len(facts)
    assert raw_recall >= min_raw, missed
    by_subject: dict[str, int] = {}
    for f, good in zip(facts, ok):
        by_subject[f.subject] = by_subject.get(f.subject, 0) + good
    complete = sum(v == 3 for v in by_subject.values())
    print(f"{subjects}x3: raw {raw_recall:.3f}, {complete} subjects with all three")
    assert complete >= min_complete, missed  # most subjects keep all three facts
