"""Nap and deep sleep on the real default model: consolidation into LoRA adapters,
validation with MEMIT off, restarts, rejection, forgetting, interruption."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch

from sleepwake.config import MemoryConfig, PressureConfig, SleepConfig
from sleepwake.facts import Fact, mentions
from sleepwake.sleep.pressure import pressure

FACTS = [
    Fact("Anselm Kreutzer", "lives in", "Lisbon"),
    Fact("Anselm Kreutzer", "works as a", "carpenter"),
    Fact("Zofia Wróblewska", "works as a", "veterinarian"),
    Fact("Mateus Okonkwo", "was born in", "Kraków"),
]


def snapshot(mem) -> dict[str, torch.Tensor]:
    return {n: mem.lm.arch.weight(n).clone() for n in mem.weights.names}


def same_weights(mem, snap) -> bool:
    return set(mem.weights.names) >= set(snap) and all(torch.equal(mem.lm.arch.weight(n), w) for n, w in snap.items())


@pytest.fixture(scope="module")
def injected(tmp_path_factory, lm, cache_dir):
    from sleepwake.memory import Memory

    home = tmp_path_factory.mktemp("sleep") / "home"
    with Memory(lm, home=home, config=MemoryConfig(progress=False), cache_dir=cache_dir, progress=False) as mem:
        mem.inject(FACTS)
    return home


@pytest.fixture(scope="module")
def napped(injected, tmp_path_factory, lm, cache_dir):
    """A copy of the injected home after one nap; returns (home, report, answers)."""
    from sleepwake.memory import Memory

    home = tmp_path_factory.mktemp("napped") / "home"
    shutil.copytree(injected, home)
    with Memory(lm, home=home, config=MemoryConfig(progress=False), cache_dir=cache_dir, progress=False) as mem:
        report = mem.nap()
        answers = [mem.ask(f.chat_question()) for f in FACTS]
    return home, report, answers


def copy_of(home, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(home, dst)
    return dst


pytestmark = pytest.mark.slow


def test_nap_moves_facts_into_an_adapter_recalled_with_memit_off(napped, make_memory, tmp_path):
    home, report, answers = napped
    assert report.status == "accepted", report.reason
    print(f"\nnap on {len(FACTS)} facts: chat {report.chat_recall} raw {report.raw_recall} "
          f"ppl {report.ppl_before:.3f} -> {report.ppl_after:.3f} in {report.seconds:.1f} s")
    mem = make_memory(copy_of(home, tmp_path))
    assert len(report.consolidated) >= 3
    consolidated = {r.id for r in mem.facts() if r.where == "consolidated"}
    assert consolidated == set(report.consolidated)
    assert set(mem._edits) == set(report.kept)  # the consolidated facts' MEMIT edits are gone
    assert (mem.home / "adapters").is_dir() and len(mem._adapters) == 1
    mem._rebuild([], None)  # every MEMIT edit off: the adapter alone
    ok = [mentions(mem.ask(f.chat_question()), f.object) for f in FACTS]
    assert sum(ok) >= len(report.consolidated)
    assert report.ppl_after <= report.ppl_before * 1.05
    assert sum(mentions(a, f.object) for a, f in zip(answers, FACTS)) == len(FACTS)  # everything still answered


_CHILD = """
import json, sys
from sleepwake.memory import Memory
from sleepwake.config import MemoryConfig
mem = Memory(home=sys.argv[1], cache_dir=sys.argv[2], config=MemoryConfig(progress=False))
from safetensors.torch import save_file
save_file({n: mem.lm.arch.weight(n).clone() for n in mem.weights.names}, sys.argv[3])
print(json.dumps([mem.ask(q) for q in sys.argv[4:]]))
"""


def test_restart_after_nap_gives_the_same_weights_and_answers(napped, make_memory, cache_dir, tmp_path):
    from safetensors.torch import load_file

    home, _, answers = napped
    mem = make_memory(copy_of(home, tmp_path))
    here = snapshot(mem)
    mem.close()
    out = subprocess.run([sys.executable, "-c", _CHILD, str(mem.home), str(cache_dir), str(tmp_path / "w.st"),
                          *(f.chat_question() for f in FACTS)],
                         capture_output=True, text=True, check=True, timeout=300)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == answers
    there = load_file(str(tmp_path / "w.st"))
    assert set(there) == set(here) and any("down_proj" in n for n in here)
    for n, w in here.items():
        assert torch.equal(there[n], w), n


def test_rejected_sleep_leaves_everything_as_it_was(injected, make_memory, tmp_path):
    strict = MemoryConfig(progress=False, nap=SleepConfig(max_ppl_increase=-1.0))  # no nap can pass this
    mem = make_memory(copy_of(injected, tmp_path), strict)
    before = snapshot(mem)
    ledger = [(r.id, r.where) for r in mem.facts()]
    report = mem.nap()
    assert report.status == "rejected" and "perplexity" in report.reason
    assert same_weights(mem, before)
    assert [(r.id, r.where) for r in mem.facts()] == ledger
    assert [c["status"] for c in mem.history()] == ["rejected"]
    assert not any((mem.home / "adapters").glob("*")) if (mem.home / "adapters").exists() else True


def test_forget_after_sleep_removes_a_consolidated_fact(napped, make_memory, tmp_path):
    home, _, _ = napped
    mem = make_memory(copy_of(home, tmp_path))
    gone = next(r for r in mem.facts() if r.where == "consolidated" and r.fact.subject == "Zofia Wróblewska")
    mem.forget(gone.id)
    assert mem.status(measure_perplexity=False)["rebuild_pending"]
    rep = mem.sleep()
    assert rep.status == "accepted" and rep.rebuilt, rep.reason
    assert not mentions(mem.ask(gone.fact.chat_question()), gone.fact.object)
    others = [r.fact for r in mem.facts()]
    assert gone.id not in {r.id for r in mem.facts()}
    assert sum(mentions(mem.ask(f.chat_question()), f.object) for f in others) >= len(others) - 1
    assert len(mem._adapters) == 1 and not mem.status(measure_perplexity=False)["rebuild_pending"]


_KILLED = """
import sys
from sleepwake.memory import Memory
from sleepwake.config import MemoryConfig
mem = Memory(home=sys.argv[1], cache_dir=sys.argv[2], config=MemoryConfig(progress=False))
mem.nap()
"""


def test_a_sleep_killed_midway_leaves_the_last_good_state(injected, make_memory, cache_dir, tmp_path):
    home = copy_of(injected, tmp_path)
    mem = make_memory(home)
    before = snapshot(mem)
    mem.close()
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, str(home), str(cache_dir)])
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # wait until the nap is under way, then kill it without warning
            with sqlite3.connect(home / "memory.sqlite") as db:
                if db.execute("SELECT count(*) FROM cycles WHERE status='running'").fetchone()[0]:
                    break
            assert proc.poll() is None, "the nap ended before it could be interrupted"
            time.sleep(0.2)
        time.sleep(3)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
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
    with pytest.raises(ValueError):
        PressureConfig(nap_at=0.9, deep_at=0.5)


def test_auto_sleep_naps_when_pressure_is_due(injected, make_memory, tmp_path):
    cfg = MemoryConfig(progress=False, auto_sleep=True, pressure=PressureConfig(max_edits=5))  # 5 facts → 0.6
    mem = make_memory(copy_of(injected, tmp_path), cfg)
    result = mem.inject(Fact("Ilse Brandvold", "lives in", "Tromsø"))
    assert result.slept is not None and result.slept.kind == "nap"
    assert mem.status(measure_perplexity=False)["pressure"]["edits"] < 0.6
