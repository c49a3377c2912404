"""`sleepwake.policy`: what is held where, without a model (both backends use these rules)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sleepwake.config import MemitConfig
from sleepwake.errors import UnknownFactError
from sleepwake.facts import Fact
from sleepwake.policy import (
    batches,
    chat_edits,
    edit_group,
    fact_id,
    keyed_off,
    plan_forget,
    plan_injection,
    shares_edit,
)
from sleepwake.store import FactRecord

SUBJECT = MemitConfig()
LAST = MemitConfig(key_positions="last")


def rec(i: int, text: str, where: str = "memit", cycle: int | None = None, status: str = "active") -> FactRecord:
    return FactRecord(i, Fact.parse(text), status, 0.0, where=where, cycle=cycle)


def test_edit_groups_follow_the_key_positions():
    a, b = Fact.parse("Ana Reis | lives in | Porto"), Fact.parse("ana reis | works as | a baker")
    assert edit_group(a, SUBJECT) == edit_group(b, SUBJECT) == "ana reis"
    assert shares_edit(a, b, SUBJECT) and not shares_edit(a, b, LAST)


def test_batches_keep_a_subject_together_and_stay_near_the_size():
    facts = [Fact.parse(t) for t in ("A | lives in | X", "B | lives in | Y", "A | works as | a cook",
                                     "C | lives in | Z", "A | was born in | W", "D | lives in | V")]
    out = batches(facts, 3, SUBJECT)
    assert [[f.subject for f in b] for b in out] == [["A", "A", "A"], ["B", "C", "D"]]
    assert sorted(f.key for b in out for f in b) == sorted(f.key for f in facts)
    # Without subject keys every fact is its own group: plain batches of the size.
    assert [len(b) for b in batches(facts, 4, LAST)] == [4, 2]
    # A group larger than the size is not split (its facts share one edit).
    assert [len(b) for b in batches(facts[:5], 2, SUBJECT)] == [3, 2]


def test_chat_edits_stop_past_the_limit():
    assert chat_edits(MemitConfig(chat_edit_max_facts=40), 40)
    assert not chat_edits(MemitConfig(chat_edit_max_facts=40), 41)
    assert chat_edits(MemitConfig(chat_edit_max_facts=None), 10**6)
    assert not chat_edits(MemitConfig(chat_edit=False), 1)


def test_plan_injection_replaces_skips_and_keeps_the_last_of_a_slot():
    active = {r.fact.key: r for r in (rec(1, "Ana Reis | lives in | Porto"), rec(2, "Ana Reis | works as | a baker"))}
    plan = plan_injection([Fact.parse("ana reis | lives in | Braga"), Fact.parse("Ana Reis | works as | a baker"),
                           Fact.parse("Rui Sá | lives in | Faro"), Fact.parse("Rui Sá | lives in | Évora")], active)
    # The update keeps the stored spelling of the slot, so its prompt still works.
    assert [(f.subject, f.object) for f in plan.todo] == [("Ana Reis", "Braga"), ("Rui Sá", "Évora")]
    assert [f.object for f in plan.skipped] == ["a baker"]


def test_keyed_off_names_subjects_in_memit_suspended_or_stale():
    entries = {"ana reis": SimpleNamespace(facts=(1, 2)), "rui sá": SimpleNamespace(facts=(3,)),
               "eva lim": SimpleNamespace(facts=(4,)), "ola nor": SimpleNamespace(facts=(5,))}
    memit = [rec(6, "Ana Reis | has a dog named | Bolt")]
    off = keyed_off(entries, consolidated={1, 2, 3, 5}, memit=memit, suspended={"ola nor"}, cfg=SUBJECT)
    # Ana: a fact in MEMIT; Eva: her entry's fact 4 is no longer consolidated (forgotten); Ola: being edited.
    assert off == {"ana reis", "eva lim", "ola nor"}


def test_fact_id_reads_ints_and_their_text_only():
    assert fact_id(7) == 7 and fact_id("12") == 12
    for bad in ("seven", True, 1.5, None):
        with pytest.raises(UnknownFactError, match="integer"):
            fact_id(bad)


def test_plan_forget_edits_again_what_shared_the_edit():
    memit = [rec(1, "Ana Reis | lives in | Porto"), rec(2, "Ana Reis | works as | a baker"),
             rec(3, "Rui Sá | lives in | Faro")]
    plan = plan_forget(memit[0], memit, [], set(), SUBJECT)
    assert [r.id for r in plan.again] == [2] and plan.back == []
    assert plan_forget(memit[0], memit, [], set(), LAST).redo == []
    # A fact of a keyed entry: its subject's other consolidated facts go back to MEMIT.
    held = [rec(4, "Eva Lim | lives in | Oslo", "consolidated", 1), rec(5, "Eva Lim | works as | a nurse",
                                                                        "consolidated", 1)]
    assert [r.id for r in plan_forget(held[0], memit, held, {1}, SUBJECT).back] == [5]
    # ...but not from a LoRA cycle: the next sleep rebuilds without it.
    assert plan_forget(held[0], memit, held, set(), SUBJECT).redo == []
    with pytest.raises(UnknownFactError, match="not active"):
        plan_forget(rec(9, "X | lives in | Y", status="forgotten"), memit, [], set(), SUBJECT)
