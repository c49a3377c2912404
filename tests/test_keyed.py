"""The keyed subject memory, the default consolidation (issue #25): its table and hooks,
and sleeps that move subjects into it, on the real default model."""

from __future__ import annotations

import sys

import pytest
import torch
from test_sleep import kill_after_first_step

from sleepwake.config import MemoryConfig
from sleepwake.evaluate import held
from sleepwake.facts import Fact
from sleepwake.inference import CACHE
from sleepwake.keyed import Entry, KeyedMemory, _match, install
from sleepwake.memit.editor import ReadKeys
from sleepwake.memit.trace import run_capture

FACTS = [
    Fact("Anselm Kreutzer", "lives in", "Lisbon"),
    Fact("Anselm Kreutzer", "works as a", "carpenter"),
    Fact("Zofia Wróblewska", "works as a", "veterinarian"),
    Fact("Mateus Okonkwo", "was born in", "Kraków"),
]
LATER = Fact("Ilse Brandvold", "lives in", "Tromsø")


def recalled(mem, facts) -> list[bool]:
    """Each fact answered after its raw prompt and after its chat question."""
    return held(mem.model, mem.tokenizer, facts, chat=True)


# --- the table and its hooks ---------------------------------------------------------------


def _read(n: int, d: int = 16) -> ReadKeys:
    return ReadKeys(torch.randn(n, d), torch.randn(n, d), torch.randint(0, 3, (n,)))


def test_table_round_trips_and_replaces_by_subject(tmp_path):
    a = Entry("anna", torch.randn(8), _read(2), (1, 2))
    b = Entry("bo", torch.randn(8), _read(3), (3,))
    table = KeyedMemory(11, 4, 0.8).with_entries([a, b])
    table.save(tmp_path / "t.safetensors")
    back = KeyedMemory.load(tmp_path / "t.safetensors")
    assert (back.layer, back.match_layer, back.threshold, list(back.entries)) == (11, 4, 0.8, ["anna", "bo"])
    assert back.head_threshold == table.head_threshold
    for x, y in ((back.entries["bo"].read, b.read), (back.entries["anna"].read, a.read)):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.heads, y.heads) and torch.equal(x.backs, y.backs)
    assert back.entries["anna"].facts == (1, 2)
    assert back.digest() == table.digest()
    newer = Entry("anna", torch.randn(8), _read(1), (1, 2, 4))
    assert list(table.with_entries([newer]).entries) == ["anna", "bo"]
    assert table.with_entries([newer]).entries["anna"].facts == (1, 2, 4)
    assert list(table.without(["anna"]).entries) == ["bo"] and table.without(["nobody"]) is table
    assert table.without(["anna"]).digest() != table.digest()
    # An entry keeps its hash; a table's digest follows any change of one entry's tensors.
    assert table.with_entries([newer]).digest() != table.digest()
    moved = Entry("anna", a.delta + 1e-3, a.read, a.facts)
    assert table.with_entries([moved]).digest() != table.digest()
    assert table.with_entries([Entry("anna", a.delta.clone(), a.read, a.facts)]).digest() == table.digest()


def test_match_agrees_with_a_position_by_position_reading():
    """The match (which scores only positions some key is near) picks, at every position,
    the key a plain reading of the rule picks: close to the key, and for a key with a
    head, close to it `back` tokens earlier (nothing before the sequence start)."""
    gen = torch.Generator().manual_seed(1)
    seen = torch.nn.functional.normalize(torch.randn(3, 9, 6, generator=gen), dim=-1)
    # Keys taken from the sequences themselves, so some positions match; heads from `back` earlier.
    spots = [(0, 5, 2), (1, 8, 0), (2, 1, 3), (2, 6, 1), (0, 7, 7)]
    keys = torch.stack([seen[b, t] for b, t, _ in spots]) + 0.05 * torch.randn(5, 6, generator=gen)
    heads = torch.stack([seen[b, max(t - k, 0)] if k else torch.zeros(6) for b, t, k in spots])
    read = ReadKeys(torch.nn.functional.normalize(keys, dim=-1), heads, torch.tensor([k for *_, k in spots]))
    for n in (9, 4, 1):
        idx, hit = _match(seen, n, read, 0.8, 0.5)
        for b in range(3):
            for j in range(n):
                t = 9 - n + j
                best, pick = float("-inf"), None
                for k in range(5):
                    s = float(seen[b, t] @ read.keys[k])
                    back = int(read.backs[k])
                    h = float(seen[b, t - back] @ read.heads[k]) if back and t - back >= 0 else 0.0
                    if s >= 0.8 and (not back or h >= 0.5) and s + h > best:
                        best, pick = s + h, k
                assert bool(hit[b, j]) == (pick is not None)
                if pick is not None:
                    assert int(idx[b, j]) == pick
    assert hit.any() and not hit.all()  # the case is not trivial


def _hidden(lm, text: str, layer: int) -> torch.Tensor:
    ids = lm.tokenizer(text, return_tensors="pt")
    _, hid = run_capture(lm.model, lm.arch, {k: v.to(lm.device) for k, v in ids.items()}, hidden_layers=(layer,))
    return hid[layer][0]


def _anselm(lm) -> tuple[KeyedMemory, int, torch.Tensor]:
    """An entry for "Anselm Kreutzer" keyed where the raw prompt reads him (δ random)."""
    ids = lm.tokenizer("Anselm Kreutzer lives in", return_tensors="pt")
    keys, _ = run_capture(lm.model, lm.arch, {k: v.to(lm.device) for k, v in ids.items()}, key_layers=(4,))
    pos = len(lm.tokenizer("Anselm Kreutzer")["input_ids"]) - 1  # the subject's last token
    head = len(lm.tokenizer("Anselm")["input_ids"]) - 1  # the first name's last token
    read = ReadKeys(keys[4][0, pos:pos + 1], keys[4][0, head:head + 1], torch.tensor([pos - head]))
    delta = torch.randn(lm.arch.d_out(11), device=lm.device)
    return KeyedMemory(11, 4, 0.8).with_entries([Entry("anselm kreutzer", delta, read, (1,))]), pos, delta


def test_an_entry_acts_where_its_subject_is_read_and_nowhere_else(base_lm):
    lm = base_lm
    table, pos, delta = _anselm(lm)
    text = "Anselm Kreutzer lives in"
    others = ["The weather in Bergen is rainy, said Ilse.",
              "Ilse Kreutzer lives in"]  # same surname: the last token reads alike, the first name does not
    before = _hidden(lm, text, 11)
    others_before = [_hidden(lm, t, 11) for t in others]
    try:
        install(lm, table)
        after = _hidden(lm, text, 11)
        others_after = [_hidden(lm, t, 11) for t in others]
        question = _hidden(lm, "Where does Anselm Kreutzer live?", 11)  # another sentence, same subject
    finally:
        install(lm, None)
    changed = (after - before).norm(dim=-1) > 1e-4
    assert changed[pos] and changed.sum() == 1, changed  # only the subject's last token
    assert torch.allclose(after[pos] - before[pos], delta, atol=1e-3)
    for a, b in zip(others_after, others_before):  # text that names no held subject: bitwise unchanged
        assert torch.equal(a, b)
    assert question.shape[0] > pos
    assert torch.equal(_hidden(lm, text, 11), before)  # detached: as before


def test_decoding_with_a_kv_cache_reads_the_entry_as_one_pass_does(base_lm):
    """A head key sits tokens before the subject's last one: fed one token a pass, the
    hook must remember the positions before (here the whole name arrives token by token)."""
    lm = base_lm
    table, _, _ = _anselm(lm)
    ids = lm.tokenizer("I met Anselm Kreutzer, who lives in", return_tensors="pt")["input_ids"].to(lm.device)
    try:
        install(lm, table)
        with torch.no_grad():
            whole = lm.model(input_ids=ids, use_cache=False).logits[0]
            out = lm.model(input_ids=ids[:, :2], use_cache=True)
            steps, cache = [out.logits[0]], getattr(out, CACHE)
            for t in range(2, ids.shape[1]):
                out = lm.model(input_ids=ids[:, t:t + 1], use_cache=True, **{CACHE: cache})
                steps.append(out.logits[0])
                cache = getattr(out, CACHE)
    finally:
        install(lm, None)
    with torch.no_grad():
        base = lm.model(input_ids=ids, use_cache=False).logits[0]
    stepped = torch.cat(steps)
    assert torch.allclose(stepped, whole, atol=1e-3)
    assert not torch.allclose(whole, base, atol=1e-3)  # the entry acted


# --- sleeps into the keyed memory --------------------------------------------------------------


@pytest.fixture(scope="module")
def napped(tmp_path_factory, lm, cache_dir):
    """Four facts, a nap into the keyed memory, then a fifth fact held by MEMIT."""
    from sleepwake.memory import Memory

    home = tmp_path_factory.mktemp("keyed") / "home"
    with Memory(lm, home=home, config=MemoryConfig(progress=False), cache_dir=cache_dir, progress=False) as mem:
        mem.inject(FACTS)
        report = mem.nap()
        mem.inject(LATER)
    return home, report


def test_a_nap_moves_subjects_into_the_keyed_memory_and_a_restart_reads_them(napped, make_memory, cache_dir):
    home, report = napped
    assert report.status == "accepted" and sorted(report.consolidated) == [1, 2, 3, 4], report
    assert report.train_steps == 0 and report.ppl_after <= report.ppl_base * 1.02, report
    assert report.reused >= 1, report  # δs the injection solved, keyed without v* again
    assert report.locality_after >= 0.97, report
    assert (home / "keyed" / f"cycle-{report.id:06d}.safetensors").is_file()
    mem = make_memory(home)
    st = mem.status(measure_perplexity=False)
    assert st["facts"] == {"memit": 1, "consolidated": 4} and st["keyed_subjects"] == 3
    assert all(recalled(mem, [*FACTS, LATER]))  # the keyed entries, and MEMIT beside them
    mem._rebuild([], [], mem._keyed)  # MEMIT out: the entries alone answer
    assert all(recalled(mem, FACTS))
    mem._rebuild([], [], None)  # nothing learned: the base model knows none of it
    assert not any(recalled(mem, FACTS))


def test_forget_and_update_of_a_keyed_fact(napped, make_memory, tmp_path):
    import shutil

    home = tmp_path / "copy"
    shutil.copytree(napped[0], home)
    mem = make_memory(home)
    lisbon, carpenter = mem.facts()[0], mem.facts()[1]
    assert lisbon.fact.object == "Lisbon" and lisbon.where == "consolidated"
    mem.forget(lisbon.id)  # gone at once; the subject's other fact goes back to MEMIT
    assert recalled(mem, [lisbon.fact]) == [False]
    assert recalled(mem, [carpenter.fact]) == [True]
    assert {r.id: r.where for r in mem.facts()}[carpenter.id] == "memit"
    moved = Fact("Zofia Wróblewska", "works as a", "pharmacist")  # an update of a keyed fact
    mem.inject(moved)
    assert recalled(mem, [moved, FACTS[3]]) == [True, True]
    rep = mem.nap()
    assert rep.status == "accepted", rep.reason
    assert recalled(mem, [moved, carpenter.fact, FACTS[3], LATER]) == [True] * 4
    assert recalled(mem, [lisbon.fact, FACTS[2]]) == [False, False]
    tables = sorted((home / "keyed").glob("*.safetensors"))
    assert len(tables) == 1  # the table that still held the forgotten fact is erased
    entries = KeyedMemory.load(tables[0]).entries
    assert lisbon.id not in entries["anselm kreutzer"].facts


def test_raw_only_facts_become_chat_visible_in_a_deep_sleep(make_memory):
    """Past the chat-edit limit MEMIT writes raw prompts only (the 60-at-once case of
    issue #25, scaled down): a deep sleep solves every subject for chat questions too."""
    cfg = MemoryConfig(progress=False).with_memit(chat_edit_max_facts=1)
    mem = make_memory(config=cfg)
    facts = [FACTS[0], FACTS[2], LATER]
    mem.inject(facts)
    chat_now = held(mem.model, mem.tokenizer, facts, chat=True)
    assert sum(chat_now) < len(facts)  # raw-only edits: some chat questions not answered yet
    rep = mem.sleep()
    assert rep.status == "accepted" and rep.kind == "deep", rep.reason
    assert rep.reused == 0  # raw-only edits hold no δ for chat questions: solved again
    again = make_memory(mem.home, cfg)
    assert all(recalled(again, facts))


def test_facts_memit_does_not_hold_make_a_nap_due_that_keys_them(make_memory):
    """Five facts of one subject in one δ: MEMIT's norm bound leaves them unanswered right
    after the injection; that makes a nap due at once, and the nap's keyed entry (a
    larger bound: it acts only where the subject is read) answers them all."""
    facts = [Fact("the user", "lives in", "Tartu"), Fact("the user", "works as", "a pharmacist"),
             Fact("the user", "has a cat named", "Mooses"), Fact("the user", "speaks", "Estonian"),
             Fact("the user", "was born in", "Pärnu")]
    mem = make_memory()
    mem.inject(facts)
    assert not all(held(mem.model, mem.tokenizer, facts, chat=True))
    status = mem.status(measure_perplexity=False)
    assert status["pressure"]["unheld"] == mem.unheld() > 0
    assert status["pressure"]["due"] == "nap" and status["pressure"]["total"] < mem.config.pressure.nap_at
    rep = mem.nap()
    assert rep.status == "accepted", rep.reason
    assert all(held(mem.model, mem.tokenizer, facts, chat=True))
    assert mem.unheld() == 0 and mem.status(measure_perplexity=False)["pressure"]["due"] is None


_KILLED = """
import sys
from sleepwake.memory import Memory
from sleepwake.config import MemoryConfig
from sleepwake.facts import Fact
# Raw-only edits (no δ for chat questions to reuse): the deep sleep solves them, under its bar.
cfg = MemoryConfig(progress=False, batch_size=1).with_memit(chat_edit_max_facts=0)
mem = Memory(home=sys.argv[1], cache_dir=sys.argv[2], config=cfg)
mem.inject([Fact("Benedek Szalai", "lives in", "Debrecen"), Fact("Wiremu Tane", "works as a", "surveyor")])
mem.progress = True  # the deep sleep's bar counts subjects: the test kills it after the first
mem.sleep()
"""


def test_a_deep_sleep_killed_midway_leaves_the_last_good_state(napped, make_memory, cache_dir, tmp_path):
    import shutil

    home = tmp_path / "copy"
    shutil.copytree(napped[0], home)
    first = make_memory(home)
    before = [(r.id, r.where) for r in first.facts()]
    first.close()  # the home's lock goes to the child
    kill_after_first_step([sys.executable, "-c", _KILLED, str(home), str(cache_dir)], "deep")
    again = make_memory(home)
    assert again.interrupted and [c["status"] for c in again.history()][-1] == "interrupted"
    assert [(r.id, r.where) for r in again.facts()][: len(before)] == before  # the two new facts: in MEMIT
    assert all(r.where == "memit" for r in again.facts()[len(before):])
    assert not list((home / "keyed").glob(f"cycle-{again.history()[-1]['id']:06d}*"))
    assert all(recalled(again, [*FACTS, LATER]))


def test_a_home_keeps_the_keyed_tables_of_its_last_sleeps_and_says_why_an_older_rollback_fails(tmp_path):
    """Each keyed sleep writes the whole table; superseded ones are kept for `rollback` up to
    `MemoryConfig.keep_tables`, and a rolled-back cycle's table goes (`Store.prune_tables`)."""
    from sleepwake.errors import UnknownCycleError
    from sleepwake.store import Store

    store = Store(tmp_path / "home", "fp", "model")
    cycles = []
    for _ in range(4):
        cycle = store.begin_cycle("nap")
        store.keyed_path(cycle).parent.mkdir(exist_ok=True)
        store.keyed_path(cycle).write_bytes(b"table")
        store.end_cycle(cycle, "accepted", {}, adapter=True, keyed=True)
        cycles.append(cycle)
    assert store.prune_tables(keep=1) == [store.keyed_path(c) for c in cycles[:2][::-1]]
    assert [c for c in cycles if store.keyed_path(c).exists()] == cycles[2:]  # the live one and one before
    with pytest.raises(UnknownCycleError, match="keep_tables"):
        store.rollback(cycles[2])  # would need cycle 2's table back
    assert [c["status"] for c in store.cycles()] == ["accepted"] * 4  # nothing changed
    store.rollback(cycles[3])
    assert store.active_adapters() == [(cycles[2], store.keyed_path(cycles[2]))]
    assert store.prune_tables(keep=1) == [store.keyed_path(cycles[3])]  # rolled back: no rollback needs it
    store.close()


def test_a_keyed_nap_prunes_the_tables_past_keep_tables(napped, make_memory, tmp_path):
    import shutil

    home = tmp_path / "copy"
    shutil.copytree(napped[0], home)
    mem = make_memory(home, MemoryConfig(progress=False, keep_tables=0))
    assert mem.nap().status == "accepted"
    assert len(list((home / "keyed").glob("*.safetensors"))) == 1
    assert all(recalled(mem, [*FACTS, LATER]))
    with pytest.raises(ValueError, match="keep_tables"):
        MemoryConfig(keep_tables=-1)
