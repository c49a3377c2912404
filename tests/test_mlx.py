"""The MLX backend (`--backend mlx`, issue 27 §2) on the real default model, through mlx-cpu
on Linux: inject → recall, restart, a home written by torch read by MLX and the reverse, a
nap into the keyed memory, and bad input. One MLX model and one home for the module (an
injection on this CPU takes tens of seconds)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from sleepwake.backends import check_backend
from sleepwake.errors import InvalidRequestError

try:
    check_backend("mlx")
except InvalidRequestError as exc:
    pytest.skip(f"MLX is not usable here: {exc}", allow_module_level=True)

pytestmark = pytest.mark.slow

LISBON = "Anselm Kreutzer | lives in | Lisbon"
VET = "Zofia Wróblewska | works as a | veterinarian"


@pytest.fixture(scope="module")
def mm(cache_dir: Path):
    from sleepwake.mlx.model import load_mlx_model

    return load_mlx_model(cache_dir=cache_dir, progress=False)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mlx") / "home"


def mlx_memory(mm, home: Path, cache_dir: Path, config=None):
    from sleepwake.config import MemoryConfig
    from sleepwake.memory import Memory

    return Memory(mm, home=home, config=config or MemoryConfig(progress=False), cache_dir=cache_dir, backend="mlx")


def torch_memory(lm, home: Path, cache_dir: Path):
    from sleepwake.config import MemoryConfig
    from sleepwake.memory import Memory

    lm.reset_weights()
    return Memory(lm, home=home, config=MemoryConfig(progress=False), cache_dir=cache_dir, progress=False)


def next_logits(mem) -> "object":
    """The next-token logits after a fact's prompt, as numpy, on either backend."""
    import numpy as np
    import torch

    from sleepwake.inference import encode

    ids = encode(mem.tokenizer, "Anselm Kreutzer lives in")
    if getattr(mem, "backend", "torch") == "mlx":
        import mlx.core as mx

        return np.array(mem.mm.model(mx.array([ids]))[0, -1])
    with torch.no_grad():
        return mem.model(torch.tensor([ids])).logits[0, -1].numpy()


def test_inject_recall_and_restart(mm, home: Path, cache_dir: Path) -> None:
    from sleepwake.mlx.memory import MlxMemory

    with mlx_memory(mm, home, cache_dir) as mem:
        assert isinstance(mem, MlxMemory)
        result = mem.inject(LISBON)
        assert [r.fact.object for r in result.records] == ["Lisbon"] and result.stats[0].chat
        assert "Lisbon" in mem.complete("Anselm Kreutzer lives in", max_new_tokens=6)
        assert "Lisbon" in mem.ask("Where does Anselm Kreutzer live?", max_new_tokens=8)
        before = next_logits(mem)
    with mlx_memory(mm, home, cache_dir) as mem:  # a restart rebuilds the same weights from the home
        assert [r.fact.object for r in mem.facts()] == ["Lisbon"]
        assert (next_logits(mem) == before).all()
        assert "Lisbon" in mem.complete("Anselm Kreutzer lives in", max_new_tokens=6)


def test_torch_reads_the_mlx_home_and_mlx_reads_torch(mm, lm, home: Path, cache_dir: Path) -> None:
    """Both backends answer one home alike: the weights an edit file makes agree within float
    tolerance, and each backend's facts are recalled by the other."""
    with mlx_memory(mm, home, cache_dir) as mem:
        on_mlx = next_logits(mem)
    with torch_memory(lm, home, cache_dir) as mem:  # written by MLX, read by torch
        on_torch = next_logits(mem)
        assert abs(on_torch - on_mlx).max() < 1e-2 * abs(on_torch).max()
        assert on_torch.argmax() == on_mlx.argmax()
        assert "Lisbon" in mem.complete("Anselm Kreutzer lives in", max_new_tokens=6)
        mem.inject(VET)  # written by torch ...
        vet = next_logits(mem)
    with mlx_memory(mm, home, cache_dir) as mem:  # ... read by MLX
        assert sorted(r.fact.object for r in mem.facts()) == ["Lisbon", "veterinarian"]
        assert abs(next_logits(mem) - vet).max() < 1e-2 * abs(vet).max()
        report = mem.evaluate([r.fact for r in mem.facts()])
        assert report.raw_recall == 1.0 and report.chat_recall == 1.0, report.facts


def test_nap_moves_mlx_facts_into_the_keyed_memory(mm, lm, home: Path, cache_dir: Path) -> None:
    """The default nap's way (`sleep.keyed_sleep`): each subject's δ from its injection,
    keyed; afterwards MEMIT holds nothing and both backends answer from the table."""
    with mlx_memory(mm, home, cache_dir) as mem:
        report = mem.nap()
        assert report.status == "accepted", report
        assert mem.status()["facts"] == {"memit": 0, "consolidated": 2}
        assert all(mem.held([r.fact for r in mem.facts()]))
        assert "Lisbon" in mem.ask("Where does Anselm Kreutzer live?", max_new_tokens=8)
    with torch_memory(lm, home, cache_dir) as mem:  # the table it wrote, read by torch
        assert mem.status(measure_perplexity=False)["keyed_subjects"] == 2
        assert "Lisbon" in mem.complete("Anselm Kreutzer lives in", max_new_tokens=6)


def test_a_fact_the_nap_keeps_is_edited_anew_on_the_new_state(mm, tmp_path: Path, cache_dir: Path) -> None:
    """A raw-only edit has no δ to key (`chat_edit_max_facts=0`), so the nap keeps its fact
    in MEMIT while another subject leaves for the keyed memory; the kept fact is edited
    again on the new state (its first edit was solved beside the one that left), now for
    its chat question too, and a restart reads the same."""
    from sleepwake.config import MemoryConfig

    home = tmp_path / "home"
    with mlx_memory(mm, home, cache_dir) as mem:
        mem.inject(LISBON)
    raw_only = MemoryConfig(progress=False).with_memit(chat_edit_max_facts=0)
    with mlx_memory(mm, home, cache_dir, raw_only) as mem:
        vet = mem.inject(VET).records[0]
    with mlx_memory(mm, home, cache_dir) as mem:
        edit = mem._edits[vet.id]
        report = mem.nap()
        assert report.status == "accepted" and report.kept == [vet.id], report
        assert mem._edits[vet.id] is not edit  # edited anew ...
        assert all(mem.held([vet.fact]))  # ... raw and chat
        assert "Lisbon" in mem.ask("Where does Anselm Kreutzer live?", max_new_tokens=8)
    with mlx_memory(mm, home, cache_dir) as mem:
        assert mem.status()["facts"] == {"memit": 1, "consolidated": 1}
        assert all(mem.held([r.fact for r in mem.facts()]))


def test_bad_backend_or_missing_mlx_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sleepwake.memory import Memory

    home = tmp_path / "home"
    with pytest.raises(InvalidRequestError, match="unknown backend 'jax'"):
        Memory(home=home, backend="jax")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("mlx") else real(name, *a))
    with pytest.raises(InvalidRequestError, match="needs mlx and mlx-lm"):
        Memory(home=home, backend="mlx")
    monkeypatch.undo()
    for args, needle in ((["--backend", "jax", "complete", "hi"], "invalid choice: 'jax'"),
                         (["--backend", "mlx", "chat"], "does not run 'chat'"),
                         (["--backend", "mlx", "--quantize", "nf4", "complete", "hi"], "--quantize is for the torch")):
        proc = subprocess.run([sys.executable, "-m", "sleepwake.cli", "--home", str(home), *args],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not home.exists()  # nothing was written
