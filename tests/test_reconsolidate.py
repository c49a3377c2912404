"""Reconsolidation (`sleepwake.reconsolidate`): a new fact about a subject the keyed
memory holds goes into its entry at once, on the real default model."""

from __future__ import annotations

import pytest
from test_cli import run_cli

from sleepwake.config import MemoryConfig
from sleepwake.evaluate import held
from sleepwake.facts import Fact
from sleepwake.keyed import KeyedMemory

PERSON = [Fact("Kofi Asante", "lives in", "Kumasi"), Fact("Kofi Asante", "drives", "a Toyota Hilux"),
          Fact("Kofi Asante", "studies", "Korean")]
OTHER = Fact("Ilse Brandvold", "works as a", "glassblower")
LATER = [Fact("Kofi Asante", "has a parrot named", "Biscuit"), Fact("Kofi Asante", "was born in", "Tamale")]
MOVED = Fact("Kofi Asante", "lives in", "Tamale")  # an update of PERSON[0]


def answered(mem, facts) -> list[bool]:
    return held(mem.model, mem.tokenizer, facts, chat=True)


@pytest.fixture(scope="module")
def keyed_home(tmp_path_factory, lm, cache_dir):
    """A person of three facts and another of one, napped into the keyed memory."""
    from sleepwake.memory import Memory

    home = tmp_path_factory.mktemp("recon") / "home"
    with Memory(lm, home=home, config=MemoryConfig(progress=False), cache_dir=cache_dir, progress=False) as mem:
        mem.inject([*PERSON, OTHER])
        assert mem.nap().status == "accepted"
        assert {r.where for r in mem.facts()} == {"consolidated"}
    return home


def copy(home, tmp_path):
    import shutil

    shutil.copytree(home, tmp_path / "home")
    return tmp_path / "home"


@pytest.fixture(scope="module")
def reconsolidated(keyed_home, tmp_path_factory, lm, cache_dir):
    """A copy of `keyed_home` told LATER[0], which goes into Kofi's entry: (home, the
    injection's result, Kofi's δ before it). Two tests start from this state."""
    from sleepwake.memory import Memory

    home = copy(keyed_home, tmp_path_factory.mktemp("reconsolidated"))
    with Memory(lm, home=home, config=MemoryConfig(progress=False), cache_dir=cache_dir, progress=False) as mem:
        old_delta = mem._keyed.entries["kofi asante"].delta.clone()
        return home, mem.inject(LATER[0]), old_delta


def test_new_facts_and_an_update_of_a_keyed_person_go_into_the_entry_and_survive_a_restart(
        reconsolidated, make_memory, tmp_path):
    """Two tells, one at a time, each written straight into Kofi's entry: LATER[0] (the
    fixture's), then LATER[1] with MOVED, an update of a keyed fact, which replaces its
    object in the entry. (Once two tests; the update rides on the second tell, which
    saves a solve of Kofi's δ.) The saved table is the live one, a restart reads it, and
    the base model knows none of it."""
    home = copy(reconsolidated[0], tmp_path)
    mem = make_memory(home)
    old_delta = reconsolidated[2]
    results = [reconsolidated[1], mem.inject([LATER[1], MOVED])]  # two tells
    assert [[r.where for r in res.records] for res in results] == [["consolidated"], ["consolidated"] * 2]
    assert [r.stats[0].reconsolidated for r in results] == [1, 2] and not any(r.slept for r in results)
    assert mem.status(measure_perplexity=False)["facts"] == {"memit": 0, "consolidated": 6}
    assert all(answered(mem, [MOVED, *PERSON[1:], *LATER, OTHER]))
    assert answered(mem, [PERSON[0]]) == [False]  # the update replaced it
    old = next(r for r in mem.store.facts(status=None) if r.fact == PERSON[0])
    assert old.status == "replaced"
    entry = mem._keyed.entries["kofi asante"]
    assert set(entry.facts) == {r.id for r in mem.facts() if r.fact.subject == "Kofi Asante"}
    assert old.id not in entry.facts
    assert not entry.delta.equal(old_delta)
    kinds = [(c["kind"], c["status"]) for c in mem.history()]
    assert kinds == [("nap", "accepted"), ("reconsolidate", "accepted"), ("reconsolidate", "accepted")]
    assert mem.status(measure_perplexity=False)["naps_since_deep"] == 1  # a reconsolidation is no nap
    tables = sorted(p.name for p in (home / "keyed").glob("*.safetensors"))
    assert tables == ["cycle-000001.safetensors", "cycle-000003.safetensors"]  # the nap's (for rollback), the last
    # The live table is the one saved, not read back: it must be what a new process reads.
    assert mem._keyed.digest() == KeyedMemory.load(home / "keyed" / tables[-1]).digest()
    live = mem.lm.weights_digest()
    mem.close()
    shown = run_cli("history", home=home)
    assert shown.returncode == 0, shown.stderr
    assert "reconsolidate #3: accepted" in shown.stdout
    assert "2 new fact(s) written into the keyed entries of 1 subject(s)" in shown.stdout
    again = make_memory(home)  # a restart reads the new table
    assert again.lm.weights_digest() == live
    assert all(answered(again, [MOVED, *PERSON[1:], *LATER, OTHER]))
    assert answered(again, [PERSON[0]]) == [False]
    again._rebuild([], [], None)  # and the base model knows none of it
    assert not any(answered(again, [*LATER, MOVED]))


def test_a_forgotten_fact_leaves_no_table_behind(keyed_home, make_memory, tmp_path):
    home = copy(keyed_home, tmp_path)
    mem = make_memory(home)
    gone = mem.facts()[0]
    mem.forget(gone.id)  # Kofi's entry is off; his other facts go back to MEMIT
    mem.inject(Fact("Ilse Brandvold", "lives in", "Bergen"))  # Ilse's entry is live: reconsolidated
    assert mem.facts()[-1].where == "consolidated"
    assert len(list((home / "keyed").glob("*.safetensors"))) == 1  # the table that held the forgotten fact went
    assert mem.nap().status == "accepted"
    (table,) = (home / "keyed").glob("*.safetensors")
    assert gone.id not in KeyedMemory.load(table).entries["kofi asante"].facts
    assert answered(mem, [gone.fact]) == [False]
    assert all(answered(mem, [*PERSON[1:], OTHER]))


def test_a_rollback_of_a_reconsolidation_edits_its_facts_into_memit(reconsolidated, make_memory, tmp_path):
    """The fact goes back to MEMIT, edited with Kofi's consolidated facts (one δ per
    subject) under MEMIT's tighter bound. Raw it is answered; where its chat question
    is not, a nap is due at once, as after an injection, and the nap answers it."""
    home = copy(reconsolidated[0], tmp_path)
    mem = make_memory(home)
    cycle = mem.history()[-1]["id"]
    assert mem.history()[-1]["kind"] == "reconsolidate"  # LATER[0]'s
    assert mem.rollback(cycle) == [cycle]
    assert {r.fact.relation: r.where for r in mem.facts()}["has a parrot named"] == "memit"
    assert mem.store.edit_path(mem.facts()[-1].id).is_file()
    assert all(held(mem.model, mem.tokenizer, [LATER[0], OTHER], chat=False))
    in_chat = answered(mem, [LATER[0]])[0]
    assert mem.unheld() == (0 if in_chat else 1)
    mem.close()
    mem = make_memory(home)
    assert all(held(mem.model, mem.tokenizer, [LATER[0], OTHER], chat=False))  # the restart reads the same edit
    assert answered(mem, [LATER[0]])[0] == in_chat
    if not in_chat:
        assert mem.nap().status == "accepted"
    assert all(answered(mem, [*PERSON, LATER[0], OTHER]))



@pytest.mark.extended  # the ablation (`reconsolidate=False`), not the default path
def test_without_reconsolidation_a_nap_solves_the_person_again_from_the_old_entry(keyed_home, make_memory,
                                                                                   tmp_path):
    """`reconsolidate=False`: new facts of a keyed person go through MEMIT with all the
    person's facts, and the nap after solves the person's δ again (warm from the old
    entry, `keyed_sleep._starts`); all five facts are answered after it. (The person was
    napped into the keyed memory as `keyed_home` did it: the setting only changes injection.)"""
    cfg = MemoryConfig(progress=False, reconsolidate=False)
    mem = make_memory(copy(keyed_home, tmp_path), config=cfg)
    assert {r.where for r in mem.facts()} == {"consolidated"}
    assert [r.where for r in mem.inject(LATER).records] == ["memit", "memit"]
    rep = mem.nap()
    assert rep.status == "accepted", rep.reason
    assert all(answered(mem, [*PERSON, *LATER]))
