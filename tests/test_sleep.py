"""Nap and deep sleep on the real default model: consolidation into LoRA adapters,
validation with MEMIT off, restarts, rejection, forgetting, interruption."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from sleepwake.config import MemoryConfig, PressureConfig, SleepConfig
from sleepwake.errors import InvalidRequestError
from sleepwake.facts import Fact, mentions
from sleepwake.sleep.pressure import pressure, since_deep

FACTS = [
    Fact("Anselm Kreutzer", "lives in", "Lisbon"),
    Fact("Anselm Kreutzer", "works as a", "carpenter"),
    Fact("Zofia Wróblewska", "works as a", "veterinarian"),
    Fact("Mateus Okonkwo", "was born in", "Kraków"),
]
ILSE = Fact("Ilse Brandvold", "lives in", "Tromsø")  # the fifth fact, which makes a nap due
ALL = [*FACTS, ILSE]


@pytest.fixture
def make_memory(make_memory):
    """This file tests the LoRA consolidation (the paper's, `consolidation="lora"`);
    tests/test_keyed.py tests the default, the keyed memory."""
    def make(home=None, config=None):
        return make_memory(home, config or MemoryConfig(progress=False, consolidation="lora"))

    return make


def snapshot(mem) -> dict[str, torch.Tensor]:
    return {n: mem.lm.arch.weight(n).clone() for n in mem.weights.names}


def same_weights(mem, snap) -> bool:
    return set(mem.weights.names) >= set(snap) and all(torch.equal(mem.lm.arch.weight(n), w) for n, w in snap.items())


@pytest.fixture(scope="module")
def injected(tmp_path_factory, lm, cache_dir):
    from sleepwake.memory import Memory

    home = tmp_path_factory.mktemp("sleep") / "home"
    with Memory(lm, home=home, config=MemoryConfig(progress=False, consolidation="lora"), cache_dir=cache_dir, progress=False) as mem:
        mem.inject(FACTS)
    return home


@pytest.fixture(scope="module")
def napped(injected, tmp_path_factory, lm, cache_dir):
    """A copy of the injected home, a fifth fact, then the nap its pressure calls for.
    Returns (home, report, answers after the nap, weights before it)."""
    from sleepwake.memory import Memory

    home = tmp_path_factory.mktemp("napped") / "home"
    shutil.copytree(injected, home)
    cfg = MemoryConfig(progress=False, consolidation="lora", pressure=PressureConfig(max_edits=5))  # 5 edits: pressure 0.6
    cfg = replace(cfg, nap=SleepConfig(epochs=1))  # a short schedule keeps the suite short
    with Memory(lm, home=home, config=cfg, cache_dir=cache_dir, progress=False) as mem:
        mem.inject(ILSE)
        before = snapshot(mem)
        assert mem.status()["pressure"]["due"] == "nap"
        report = mem.sleep_if_due()
        answers = [mem.ask(f.chat_question()) for f in ALL]
    return home, report, answers, before


def copy_of(home, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(home, dst)
    return dst


pytestmark = pytest.mark.slow


def test_nap_moves_facts_into_an_adapter_recalled_with_memit_off(napped, make_memory, tmp_path):
    home, report, answers, _ = napped
    assert report.kind == "nap" and report.status == "accepted", report.reason
    print(f"\nnap on {len(ALL)} facts: chat {report.chat_recall} raw {report.raw_recall} "
          f"ppl {report.ppl_before:.3f} -> {report.ppl_after:.3f} in {report.seconds:.1f} s")
    # The edits taken over answer every fact in chat by themselves, so the trained part,
    # which cannot answer more, is dropped: the nap changes the model least.
    assert report.trained_part_dropped and report.train_steps > 0, report
    # Judged against the base model too (BudgetConfig): within +3% and locality ≥ 0.95.
    assert report.ppl_after <= report.ppl_base * 1.03 and report.locality_after >= 0.95, report
    mem = make_memory(copy_of(home, tmp_path))
    assert len(report.consolidated) >= 3
    consolidated = {r.id for r in mem.facts() if r.where == "consolidated"}
    assert consolidated == set(report.consolidated)
    assert set(mem._edits) == set(report.kept)  # the consolidated facts' MEMIT edits are gone
    assert (mem.home / "adapters").is_dir() and len(mem._adapters) == 1
    mem._rebuild([], None)  # every MEMIT edit off: the adapter alone
    ok = [mentions(mem.ask(f.chat_question()), f.object) for f in ALL]
    assert sum(ok) >= len(report.consolidated)
    assert report.ppl_after <= report.ppl_before * 1.05
    assert sum(mentions(a, f.object) for a, f in zip(answers, ALL)) == len(ALL)  # everything still answered
    assert mem.status(measure_perplexity=False)["pressure"]["due"] is None  # the nap relieved the pressure


def test_the_locality_gate_checks_many_real_facts_apart_from_the_benchmark(napped, make_memory, cache_dir, tmp_path):
    """The budget's locality gate (`BudgetConfig.min_locality`) reads real-world facts the
    base model completes, none of the locality benchmark's, kept in the home; an edit that
    breaks one of them shows in it (it held one fact on this model until session 29)."""
    from sleepwake.corpus import locality_facts
    from sleepwake.memory_base import GATE_META

    home, report, _, _ = napped
    mem = make_memory(copy_of(home, tmp_path))
    gate = mem.gate_facts()
    assert len(gate) >= 50, len(gate)
    assert not {f.key for f in gate} & {f.key for f in locality_facts()}
    assert mem.store.meta(GATE_META) is not None  # found once, at the nap
    # ... and kept in the cache directory for the next process on this model (`_gate_cache_path`)
    assert mem.store.meta(GATE_META) in {p.read_text(encoding="utf-8") for p in (cache_dir / "gate").glob("*.json")}
    assert report.locality_after >= 0.95
    before = mem.locality()
    target = gate[0]
    mem.inject(Fact(target.subject, target.relation, "Zanzibar"))
    broken = mem.locality()
    assert broken <= before - 1 / len(gate) + 1e-9
    mem.close()

    # Under a budget it cannot meet, a nap is judged against the locality before it, which is
    # measured then (on the committed state) and only then; the nap's result is what stays live.
    from sleepwake.config import BudgetConfig

    strict = make_memory(mem.home, MemoryConfig(progress=False, budget=BudgetConfig(min_locality=1.0)))
    report = strict.nap()
    assert report.locality_after < 1.0 and report.locality_before == broken, report
    assert report.status == ("accepted" if report.locality_after >= broken else "rejected"), report
    assert strict.locality() == (report.locality_after if report.status == "accepted" else broken)
    assert make_memory(mem.home).locality() == strict.locality()  # the live model is the committed one


def test_new_facts_after_a_nap_leave_consolidated_facts_alone(napped, make_memory, tmp_path):
    """A MEMIT edit after a nap keeps the consolidated facts' keys fixed (eq. 5), so it
    does not write over what the adapter holds."""
    home, report, answers, _ = napped
    mem = make_memory(copy_of(home, tmp_path))
    new = Fact("Oskar Lindqvist", "works at", "Ericsson")
    mem.inject(new)
    assert mentions(mem.ask(new.chat_question()), new.object)
    held = [f for f, a in zip(ALL, answers) if mentions(a, f.object)]
    assert sum(mentions(mem.ask(f.chat_question()), f.object) for f in held) >= len(held) - 1


@pytest.mark.extended  # the keyed memory's own: tests/test_keyed.py, test_reconsolidate.py
def test_a_new_fact_about_a_consolidated_subject_carries_its_other_facts(napped, make_memory, tmp_path):
    """Anselm's two facts live in the nap's adapter; a third is read at the same key (his
    name), which cannot both stay fixed for them and change for it. The new edit carries
    them along, so all three are answered; forgetting it gives them back to the adapter."""
    home, report, _, _ = napped
    mem = make_memory(copy_of(home, tmp_path))
    where = {r.fact.key: r.where for r in mem.facts()}
    anselm = [f for f in FACTS if f.subject == "Anselm Kreutzer"]
    assert all(where[f.key] == "consolidated" for f in anselm), where
    new = Fact("Anselm Kreutzer", "was born in", "Gdynia")
    rec = mem.inject(new).records[0]
    res = mem.evaluate([*anselm, new])
    assert res.raw_recall == 1.0 and res.chat_recall == 1.0, [(f.raw_completion, f.chat_answer) for f in res.facts]
    assert {r.fact.key: r.where for r in mem.facts()}[new.key] == "memit"
    mem.forget(rec.id)
    res = mem.evaluate(anselm)
    assert res.raw_recall == 1.0 and res.chat_recall == 1.0, [(f.raw_completion, f.chat_answer) for f in res.facts]


_CHILD = """
import json, sys
from sleepwake.memory import Memory
from sleepwake.config import MemoryConfig
mem = Memory(home=sys.argv[1], cache_dir=sys.argv[2], config=MemoryConfig(progress=False, consolidation="lora"))
from safetensors.torch import save_file
save_file({n: mem.lm.arch.weight(n).clone() for n in mem.weights.names}, sys.argv[3])
print(json.dumps([mem.ask(q) for q in sys.argv[4:]]))
"""


def test_restart_after_nap_gives_the_same_weights_and_answers(napped, make_memory, cache_dir, tmp_path):
    from safetensors.torch import load_file

    home, _, answers, _ = napped
    mem = make_memory(copy_of(home, tmp_path))
    here = snapshot(mem)
    mem.close()
    out = subprocess.run([sys.executable, "-c", _CHILD, str(mem.home), str(cache_dir), str(tmp_path / "w.st"),
                          *(f.chat_question() for f in ALL)],
                         capture_output=True, text=True, check=True, timeout=300)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == answers
    there = load_file(str(tmp_path / "w.st"))
    assert set(there) == set(here) and any("down_proj" in n for n in here)
    for n, w in here.items():
        assert torch.equal(there[n], w), n


def test_rejected_sleep_leaves_everything_as_it_was(injected, make_memory, tmp_path):
    strict = MemoryConfig(progress=False, consolidation="lora", nap=SleepConfig(epochs=1, max_ppl_increase=-1.0))  # no nap passes this
    mem = make_memory(copy_of(injected, tmp_path), strict)
    before = snapshot(mem)
    ledger = [(r.id, r.where) for r in mem.facts()]
    report = mem.nap()
    assert report.status == "rejected" and "perplexity" in report.reason
    assert same_weights(mem, before)
    assert [(r.id, r.where) for r in mem.facts()] == ledger
    assert [c["status"] for c in mem.history()] == ["rejected"]
    assert not any((mem.home / "adapters").glob("*")) if (mem.home / "adapters").exists() else True


@pytest.mark.extended  # the keyed memory's own: tests/test_keyed.py, test_reconsolidate.py
def test_forget_after_sleep_removes_a_consolidated_fact(napped, make_memory, tmp_path):
    home, _, _, _ = napped
    mem = make_memory(copy_of(home, tmp_path), MemoryConfig(progress=False, consolidation="lora", deep=SleepConfig(epochs=1, dreams=4)))
    gone = next(r for r in mem.facts() if r.where == "consolidated" and r.fact.subject == "Zofia Wróblewska")
    mem.forget(gone.id)
    assert mem.status(measure_perplexity=False)["rebuild_pending"]
    conv = mem.store.new_conversation()  # what was said since: curation picks what to learn
    told = "My neighbour Ilse Brandvold lives in Tromsø."
    for user, reply, facts in [(told, "Tromsø is a lovely Arctic city with northern lights.", [ILSE]),
                               ("What time is it?", "I cannot tell the time.", []),
                               (told, "Tromsø is a lovely Arctic city with northern lights.", [ILSE])]:
        mem.store.add_message(conv, "user", user, facts)
        mem.store.add_message(conv, "assistant", reply)
    rep = mem.sleep()
    assert rep.status == "accepted" and rep.rebuilt, rep.reason
    assert (rep.exchanges, rep.exchanges_kept) == (3, 1)  # the question and the repeat are dropped
    assert not rep.trained_part_dropped  # it learned an exchange, which validation cannot score
    kept = mem.store.db.execute("SELECT prompt FROM pairs WHERE source='conversation'").fetchall()
    assert kept == [(told,)] and mem.store.exchanges() == []  # kept for replay; each is curated once
    assert not mentions(mem.ask(gone.fact.chat_question()), gone.fact.object)
    others = [r.fact for r in mem.facts()]
    assert gone.id not in {r.id for r in mem.facts()}
    assert sum(mentions(mem.ask(f.chat_question()), f.object) for f in others) >= len(others) - 1
    assert len(mem._adapters) == 1 and not mem.status(measure_perplexity=False)["rebuild_pending"]


def kill_after_first_step(cmd: list[str], bar: str) -> None:
    """Run `cmd` and kill it without warning once its progress bar `bar` shows a first
    step done (not after a fixed wait, which a fast machine outran)."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    try:
        shown, deadline = b"", time.monotonic() + 240
        while not re.search(bar.encode() + rb":[^\r\n]*\b[1-9][0-9]*/[0-9]+", shown):
            left = deadline - time.monotonic()
            assert left > 0, shown[-500:]
            if select.select([proc.stderr], [], [], left)[0]:
                chunk = os.read(proc.stderr.fileno(), 4096)
                assert chunk, f"it ended before it could be interrupted: {shown[-500:]!r}"
                shown += chunk
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()


_KILLED = """
import sys
from sleepwake.memory import Memory
from sleepwake.config import MemoryConfig
mem = Memory(home=sys.argv[1], cache_dir=sys.argv[2], config=MemoryConfig(progress=True, consolidation="lora"))
mem.nap()
"""


def test_a_sleep_killed_midway_leaves_the_last_good_state(injected, make_memory, cache_dir, tmp_path):
    """The nap's process is killed without warning once its training bar shows a first
    step done (not after a fixed wait, which a fast machine outran)."""
    home = copy_of(injected, tmp_path)
    mem = make_memory(home)
    before = snapshot(mem)
    mem.close()
    kill_after_first_step([sys.executable, "-c", _KILLED, str(home), str(cache_dir)], "nap")
    again = make_memory(home)
    assert again.interrupted and [c["status"] for c in again.history()] == ["interrupted"]
    assert all(r.where == "memit" for r in again.facts())
    assert same_weights(again, before)


def test_pressure_formula_and_triggers():
    cfg = PressureConfig()
    p = pressure(25, 3600, 23.0, 20.0, cfg)
    assert p.edits == pytest.approx(0.3) and p.time == pytest.approx(0.15) and p.perplexity == pytest.approx(0.015)
    assert p.total == pytest.approx(0.465) and p.due == "nap"
    assert pressure(0, 0, None, None, cfg).due is None
    assert pressure(50, 7200, 20.0, 20.0, cfg).due == "deep"  # 0.6 + 0.3
    assert pressure(10, 0, 19.0, 20.0, cfg).perplexity == 0.0  # a better model adds no pressure
    # Deep sleep in normal use: a due nap deepens after naps_per_deep naps, or after a rejection.
    assert pressure(25, 3600, 23.0, 20.0, cfg, naps_since_deep=cfg.naps_per_deep - 1).due == "nap"
    assert pressure(25, 3600, 23.0, 20.0, cfg, naps_since_deep=cfg.naps_per_deep).due == "deep"
    assert pressure(25, 3600, 23.0, 20.0, cfg, last_rejected=True).due == "deep"
    assert pressure(5, 0, None, None, cfg, naps_since_deep=99).due is None  # nothing due stays so
    assert pressure(25, 3600, 23.0, 20.0, PressureConfig(naps_per_deep=0), naps_since_deep=99).due == "nap"
    # ... once those naps consolidated a quarter of what was held before them (deep sleeps spaced by growth).
    four = {"naps_since_deep": cfg.naps_per_deep}
    assert pressure(25, 3600, 23.0, 20.0, cfg, **four, moved_since_deep=20, consolidated=420).due == "nap"
    assert pressure(25, 3600, 23.0, 20.0, cfg, **four, moved_since_deep=100, consolidated=500).due == "deep"
    assert pressure(25, 3600, 23.0, 20.0, cfg, **four, moved_since_deep=20, consolidated=420,
                    last_rejected=True).due == "deep"
    assert pressure(25, 3600, 23.0, 20.0, PressureConfig(deep_growth=0), **four, moved_since_deep=1,
                    consolidated=1000).due == "deep"
    # A fact MEMIT does not answer makes a nap due at once, whatever the pressure.
    assert pressure(1, 0, None, None, cfg, unheld=1).due == "nap"
    assert pressure(1, 0, None, None, cfg, unheld=1).unheld == 1
    assert pressure(1, 0, None, None, PressureConfig(nap_when_unheld=False), unheld=1).due is None
    with pytest.raises(ValueError):
        PressureConfig(nap_at=0.9, deep_at=0.5)
    with pytest.raises(ValueError):
        PressureConfig(naps_per_deep=-1)
    with pytest.raises(ValueError):
        PressureConfig(deep_growth=-0.1)

    def c(kind: str, status: str, moved: int = 0) -> dict:
        return {"kind": kind, "status": status, "report": {"consolidated": list(range(moved))}}

    assert since_deep([]) == (0, False, 0)
    assert since_deep([c("nap", "accepted", 5), c("deep", "accepted", 9), c("nap", "accepted", 3),
                       c("nap", "failed", 7), c("nap", "accepted", 4)]) == (2, False, 7)  # since the last deep
    assert since_deep([c("nap", "accepted", 2), c("nap", "rejected", 6)]) == (1, True, 2)
    assert since_deep([c("deep", "rejected"), c("nap", "accepted")]) == (1, False, 0)


def run_cli(*args: str, home) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sleepwake", "--quiet", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=300, check=False)


def test_cli_status_history_and_rollback(napped, make_memory, tmp_path):
    home, report, _, before = napped
    home = copy_of(home, tmp_path)
    st = run_cli("status", "--json", home=home)
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    assert status["facts"] == {"memit": len(report.kept), "consolidated": len(report.consolidated)}
    assert set(status["pressure"]) >= {"edits", "time", "perplexity", "total", "due"}
    assert status["chat_edits"] == {"next": True, "limit": 40}
    hist = run_cli("history", "--json", home=home)
    assert hist.returncode == 0, hist.stderr
    [cycle] = json.loads(hist.stdout)
    assert cycle["kind"] == "nap" and cycle["status"] == "accepted"
    assert cycle["report"]["chat_recall"] == report.chat_recall and cycle["report"]["seconds"] > 0
    assert run_cli("rollback", "99", home=home).returncode == 1  # unknown cycle: a clear error, nothing changes
    rb = run_cli("rollback", str(cycle["id"]), "--json", home=home)
    assert rb.returncode == 0, rb.stderr
    assert json.loads(rb.stdout)["rolled_back"] == [cycle["id"]]
    mem = make_memory(home)
    assert all(r.where == "memit" for r in mem.facts()) and not mem._adapters
    assert same_weights(mem, before)  # exactly the state before the nap


@pytest.mark.extended  # LoRA consolidation only
def test_facts_a_nap_fails_are_edited_in_again_and_rollback_restores_their_old_edits(injected, make_memory,
                                                                                     tmp_path):
    """A training that breaks facts (here: a learning rate far too high, and no gate on
    perplexity), kept although the take-over alone does better: they fail validation,
    keep a MEMIT edit written again on top of the new adapter, and are still answered;
    a rollback brings back their old edits. The nap needs some facts to fail and some to
    pass (else it is rejected); how many a rate breaks moves with float order (thread
    count), so several rates are tried, each on a fresh copy: first the one that does it
    on one thread (as in `make test`; 0.003 broke none there), then milder, then harsher."""
    for lr in (0.005, 0.003, 0.01):
        cfg = MemoryConfig(progress=False, consolidation="lora", nap=SleepConfig(epochs=1, lr=lr, cov_penalty=0.0, max_ppl_increase=100.0,
                                                           keep_training_only_if_better=False))
        mem = make_memory(copy_of(injected, tmp_path / f"lr{lr}"), cfg)
        before = snapshot(mem)
        versions = {r.id: mem.store._version(r.id) for r in mem.facts()}
        rep = mem.nap()
        if rep.status == "accepted" and rep.kept:
            break
    else:
        pytest.fail(f"no learning rate broke some facts but not all: {rep}")
    assert rep.kept_recall == 1.0, rep
    kept = [r for r in mem.facts() if r.id in rep.kept]
    assert all(r.where == "memit" and mem.store._version(r.id) == versions[r.id] + 1 for r in kept)
    assert all(mentions(mem.ask(r.fact.chat_question()), r.fact.object) for r in kept)
    mem.rollback(rep.id)
    assert {r.id: mem.store._version(r.id) for r in mem.facts()} == versions
    assert same_weights(mem, before)


def test_a_training_that_breaks_facts_is_dropped_and_the_take_over_alone_kept(injected, make_memory, tmp_path):
    """The same breaking training with the default setting: the exact take-over of the
    MEMIT edits answers every fact, so the trained part is dropped and all leave MEMIT."""
    cfg = MemoryConfig(progress=False, consolidation="lora", nap=SleepConfig(epochs=1, lr=0.01, cov_penalty=0.0, max_ppl_increase=100.0))
    mem = make_memory(copy_of(injected, tmp_path), cfg)
    before = snapshot(mem)
    rep = mem.nap()
    assert rep.status == "accepted" and rep.trained_part_dropped and not rep.kept, rep
    assert rep.chat_recall == 1.0 and sorted(rep.consolidated) == sorted(r.id for r in mem.facts()), rep
    assert all(r.where == "consolidated" for r in mem.facts()) and not mem._edits
    # the adapter is the edits it took over, nothing more: the weights are those before
    assert all(torch.allclose(mem.lm.arch.weight(n), w, atol=1e-6) for n, w in before.items())
    assert all(mentions(mem.ask(f.chat_question()), f.object) for f in FACTS)


@pytest.mark.parametrize("which", ["napped", "injected"])
def test_exported_adapter_loads_in_plain_peft_with_the_same_answers(which, request, make_memory, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file

    from sleepwake.inference import chat_text, encode, generate

    home = request.getfixturevalue(which)
    mem = make_memory(copy_of(home[0] if which == "napped" else home, tmp_path))
    facts = ALL if which == "napped" else FACTS
    ours = [mem.ask(f.chat_question()) for f in facts]
    path = mem.export_adapter(tmp_path / "export")
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and all("down_proj" in m for m in config["target_modules"])
    assert config["base_model_name_or_path"] == str(mem.lm.path)  # the converted model, a local directory
    model = AutoPeftModelForCausalLM.from_pretrained(str(path))  # base and adapter from the directory alone
    tok = mem.tokenizer
    prompts = [encode(tok, chat_text(tok, f.chat_question()), chat=True) for f in facts]
    theirs = [generate(model, tok, [p], max_new_tokens=24)[0].strip() for p in prompts]  # as `ask` does
    assert theirs == ours
    assert sum(mentions(a, f.object) for a, f in zip(theirs, facts)) >= len(facts) - 1

    # max_rank: each module's delta cut to its best approximation of that rank (Eckart–Young).
    small = mem.export_adapter(tmp_path / "small", max_rank=3)
    assert json.loads((small / "adapter_config.json").read_text())["r"] == 3 < config["r"]
    full, cut = load_file(path / "adapter_model.safetensors"), load_file(small / "adapter_model.safetensors")
    for key in (k for k in cut if k.endswith("lora_A.weight")):
        b_key = key.replace("lora_A", "lora_B")
        assert cut[key].shape[0] == cut[b_key].shape[1] == 3
        delta = (full[b_key].double() @ full[key].double()) * config["lora_alpha"] / config["r"]
        approx = cut[b_key].double() @ cut[key].double()
        s = torch.linalg.svdvals(delta)
        assert torch.allclose(torch.linalg.svdvals(approx)[:3], s[:3], rtol=1e-4, atol=1e-7)
        assert torch.allclose(torch.linalg.matrix_norm(delta - approx), s[3:].norm(), rtol=1e-3, atol=1e-7)
    with pytest.raises(InvalidRequestError, match="max_rank"):
        mem.export_adapter(tmp_path / "bad", max_rank=0)
    assert not (tmp_path / "bad").exists()


def test_budget_gate_judges_against_the_base_model_and_refuses_to_ratchet():
    from sleepwake.config import BudgetConfig
    from sleepwake.sleep.report import CycleReport, over_budget

    budget = BudgetConfig(max_ppl_increase=0.03, min_locality=0.95)

    def rep(before: float, after: float, loc_before: float | None = 1.0, loc_after: float = 1.0) -> CycleReport:
        return CycleReport(1, "nap", "rejected", ppl_base=20.0, ppl_before=before, ppl_after=after,
                           locality_before=loc_before, locality_after=loc_after)

    assert over_budget(rep(20.4, 20.5), budget) == ""  # +2.5% over base: within budget
    # +4.5% over base, though only +2.3% over the state before: the old per-cycle gate
    # (5% over the last state) let this through again and again.
    assert "over the base model's" in over_budget(rep(20.5, 20.9), budget)
    assert over_budget(rep(22.0, 21.0), budget) == ""  # over budget, but better than before: kept
    assert "locality" in over_budget(rep(20.0, 20.0, 0.97, 0.94), budget)
    assert over_budget(rep(20.0, 20.0, 0.90, 0.93), budget) == ""  # under, but better than before
    # The locality before a sleep is asked for only when the one after is under the budget.
    asked = []

    def before() -> float:
        asked.append(1)
        return 0.96

    lazy = rep(20.0, 20.0, None, 0.97)
    assert over_budget(lazy, budget, locality_before=before) == "" and not asked and lazy.locality_before is None
    lazy = rep(20.0, 20.0, None, 0.94)
    assert "it was 0.960" in over_budget(lazy, budget, locality_before=before) and asked == [1]
    assert lazy.locality_before == 0.96
    assert "rose more than 1%" in over_budget(rep(20.0, 20.3), budget, max_step=0.01)  # the sleep's own step
    assert over_budget(rep(20.0, 20.3), budget, max_step=0.05) == ""
    ratchet, ppl = [], 20.0
    for _ in range(10):  # sleeps that each add 2%: the budget stops them at +3%
        after = ppl * 1.02
        if not over_budget(rep(ppl, after), budget):
            ppl = after
        ratchet.append(ppl)
    assert ratchet[-1] <= 20.0 * 1.03
