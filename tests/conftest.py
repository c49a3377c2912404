"""Shared fixtures. Real models only: the default SmolLM2-135M-Instruct is loaded once
per session and shared; every `Memory` made on it rebuilds its own weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test` runs two workers), one thread per worker: two
    workers of two threads on two cores would fight over them, and the CLI and server
    processes the tests start inherit the setting."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


# Per-file totals of `--durations` (two workers, cold cache, session 37, less the tests since moved to
# `make test-extended`, estimated): sleep ~245 (with the model's conversion and Ĉ), keyed 229, memory
# ~210, reconsolidate ~190, quantize ~187, talk ~165, mlx ~153, cli 128, users 104, server 92,
# first_person 85, home 76, architectures 56, gemma 55, web 41, benchmarks ~36, device_map 18; the rest
# under 6. Gemma goes before its rank: on a cold cache (a fresh clone, as in CI) its test also
# converts the model and computes Ĉ.
LONGEST_FIRST = ("test_sleep.py", "test_keyed.py", "test_memory.py", "test_reconsolidate.py", "test_quantize.py",
                 "test_talk.py", "test_mlx.py", "test_gemma.py", "test_cli.py", "test_users.py", "test_server.py",
                 "test_first_person.py", "test_home.py", "test_architectures.py", "test_web.py",
                 "test_benchmarks.py", "test_device_map.py", "test_many_facts.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first, so that the two workers of `make test` end together
    (`make test` passes --no-loadscope-reorder, which keeps this order)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Converted weights and covariances persist across runs (they only depend on the model)."""
    path = Path(os.environ.get("SLEEPWAKE_TEST_CACHE", REPO / ".cache" / "test"))
    path.mkdir(parents=True, exist_ok=True)
    os.environ["SLEEPWAKE_CACHE"] = str(path)  # for CLI subprocesses
    return path


@pytest.fixture(scope="session")
def lm(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The default model, with its Ĉ and Ĉ⁻¹ made. On a cold cache one worker converts
    the model and computes Ĉ while the other waits on their file locks, so that work
    gets every core, not the one thread a worker has. Ĉ⁻¹ is computed at the worker's
    one thread: both workers compute it at once, and two threads each on two cores
    made it 26 s instead of 1 s."""
    import torch

    from sleepwake.memory import Memory
    from sleepwake.models import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or threads)
    try:
        model = load_model(cache_dir=cache_dir, progress=False)
        mem = Memory(model, home=tmp_path_factory.mktemp("warm"), cache_dir=cache_dir, progress=False)
        mem.covariances()
    finally:
        torch.set_num_threads(threads)
    with mem:
        mem.editor()
    return model


@pytest.fixture
def base_lm(lm):
    """The shared default model with its base weights, whatever earlier tests left in it."""
    lm.reset_weights()
    return lm


@pytest.fixture
def make_memory(lm, cache_dir: Path, tmp_path: Path):
    """Memory(home=...) on the shared default model; call with a home path or none."""
    from sleepwake.config import MemoryConfig
    from sleepwake.memory import Memory

    made = []

    def make(home: Path | None = None, config: MemoryConfig | None = None) -> Memory:
        mem = Memory(lm, home=home or tmp_path / "home", config=config or MemoryConfig(progress=False),
                     cache_dir=cache_dir, progress=False)
        made.append(mem)
        return mem

    yield make
    for mem in made:
        mem.close()
