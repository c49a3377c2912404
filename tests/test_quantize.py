"""`--quantize nf4` on the real default model: bitsandbytes' NF4 `Linear4bit` (its CPU path
here), with the memory's deltas in float32 beside the 4-bit weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from sleepwake.config import MemoryConfig, SleepConfig
from sleepwake.errors import InvalidRequestError
from sleepwake.facts import Fact, mentions

pytestmark = pytest.mark.slow

FACTS = [Fact("Anselm Kreutzer", "lives in", "Lisbon"), Fact("Zofia Wróblewska", "works as a", "veterinarian")]
# What bitsandbytes logs on import on a CPU with AVX512-BF16 (`quantize.bitsandbytes`), and torch's
# warning about a backward through its bf16 kernel.
NOISE = ("kernels-community", "gemm_4bit", "trust_remote_code", "autograd kernel")


@pytest.fixture(scope="module")
def nf4(cache_dir):
    """The default model in NF4, with its own Ĉ cached (other weights than float32's)."""
    from sleepwake.models import load_model

    return load_model(cache_dir=cache_dir, progress=False, quantize="nf4")


@pytest.fixture
def make_nf4(nf4, cache_dir, tmp_path):
    from sleepwake.memory import Memory

    made = []

    def make(home, config=None):
        mem = Memory(nf4, home=home, config=config or MemoryConfig(progress=False), cache_dir=cache_dir, progress=False)
        made.append(mem)
        return mem

    yield make
    for mem in made:
        mem.close()


@pytest.fixture(scope="module")
def seeded(nf4, cache_dir, tmp_path_factory):
    """A home with FACTS injected on the NF4 model: (home, digest of its weights, chat answers)."""
    from sleepwake.memory import Memory

    home = tmp_path_factory.mktemp("nf4") / "home"
    with Memory(nf4, home=home, config=MemoryConfig(progress=False), cache_dir=cache_dir, progress=False) as mem:
        mem.inject(FACTS)
        return home, nf4.weights_digest(), [mem.ask(f.chat_question()) for f in FACTS]


def copy_of(home, tmp_path):
    shutil.copytree(home, tmp_path / "copy")
    return tmp_path / "copy"


def test_inject_recalls_with_4bit_weights_untouched_and_deltas_beside_them(nf4, seeded, make_nf4, tmp_path):
    from sleepwake.quantize import is_quantized

    layers = nf4.model.model.layers
    assert all(is_quantized(m) for m in (layers[0].mlp.down_proj, layers[0].self_attn.q_proj))
    assert nf4.model.get_input_embeddings().weight.dtype == torch.float32  # embeddings, LM head: float
    assert not is_quantized(nf4.model.get_output_embeddings())
    assert nf4.fingerprint.endswith("-nf4")
    packed = {n: nf4.model.get_submodule(n).weight.data.clone() for n in ("model.layers.4.mlp.down_proj",)}
    mem = make_nf4(copy_of(seeded[0], tmp_path))
    assert all(mentions(mem.complete(f"{f.subject} {f.relation}"), f.object) for f in FACTS)
    assert [mem.ask(f.chat_question()) for f in FACTS] == seeded[2]
    assert all(mentions(a, f.object) for a, f in zip(seeded[2], FACTS)), seeded[2]
    for n, w in packed.items():  # the edit is beside the 4-bit weight, not in it
        mod = nf4.model.get_submodule(n)
        assert torch.equal(mod.weight.data, w) and mod.delta is not None and mod.delta.dtype == torch.float32
    assert nf4.weights_digest() == seeded[1]


def test_gradients_pass_through_a_4bit_map_after_inference(nf4):
    """v* and LoRA training backpropagate through 4-bit maps: bitsandbytes' CPU bf16 kernel,
    which has no backward, stays off (`quantize.prepare`)."""
    mod = nf4.model.model.layers[12].mlp.down_proj
    with torch.no_grad():
        mod(torch.randn(1, mod.in_features))  # where bitsandbytes would switch to its bf16 kernel
    x = torch.randn(3, mod.in_features, requires_grad=True)
    mod(x).sum().backward()
    assert torch.allclose(x.grad, nf4.arch.weight("model.layers.12.mlp.down_proj").sum(0).expand(3, -1), atol=1e-4)


_CHILD = """
import json, sys
from sleepwake.config import MemoryConfig
from sleepwake.facts import Fact
from sleepwake.memory import Memory
mem = Memory(home=sys.argv[1], cache_dir=sys.argv[2], config=MemoryConfig(progress=False), progress=False,
             quantize="nf4")
print(json.dumps({"digest": mem.lm.weights_digest(),
                  "answers": [mem.ask(r.fact.chat_question()) for r in mem.facts()]}))
"""


def test_a_new_process_rebuilds_the_same_weights(seeded, cache_dir):
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(seeded[0]), str(cache_dir)], capture_output=True,
                          text=True, encoding="utf-8", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert not any(n in proc.stdout + proc.stderr for n in NOISE), proc.stderr
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    assert child["digest"] == seeded[1] and child["answers"] == seeded[2]  # 4-bit loading is deterministic too


def test_cli_chat_learns_and_answers_without_bitsandbytes_noise(seeded, make_nf4, tmp_path):
    home = copy_of(seeded[0], tmp_path)
    proc = subprocess.run([sys.executable, "-m", "sleepwake.cli", "--home", str(home), "--quantize", "nf4", "chat"],
                          input="I live in Porto.\nWhere does Anselm Kreutzer live?\n/quit\n", capture_output=True,
                          text=True, encoding="utf-8", timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "learned #3: the user | lives in | Porto" in proc.stdout and mentions(proc.stdout, "Lisbon"), proc.stdout
    assert proc.stderr.strip().splitlines() == [f"sleepwake: loading the default model (memory: {home}) …"]
    assert not any(n in proc.stdout for n in NOISE), proc.stdout
    assert mentions(make_nf4(home).ask("Where does the user live?"), "Porto")  # in the home, on the 4-bit model


def test_forget_takes_the_delta_out_exactly(nf4, seeded, make_nf4, tmp_path):
    mem = make_nf4(copy_of(seeded[0], tmp_path))
    first, second = mem.facts()
    mem.forget(first.id)
    assert not mentions(mem.complete("Anselm Kreutzer lives in"), "Lisbon")
    assert mentions(mem.ask(FACTS[1].chat_question()), "veterinarian")
    mem.forget(second.id)
    assert all(nf4.model.get_submodule(n).delta is None for n in mem.weights.names)  # nothing beside the weights
    base = make_nf4(tmp_path / "empty")
    assert nf4.weights_digest() == base.lm.weights_digest()


@pytest.mark.parametrize("consolidation", ["keyed", pytest.param("lora", marks=pytest.mark.extended)])
def test_nap_then_restart_and_export(consolidation, nf4, seeded, make_nf4, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sleepwake.inference import chat_text, encode, generate
    from sleepwake.quantize import loading_options, prepare

    config = MemoryConfig(progress=False, consolidation=consolidation)
    config = replace(config, nap=SleepConfig(epochs=1))  # a short schedule keeps the suite short
    home = copy_of(seeded[0], tmp_path)
    mem = make_nf4(home, config)
    report = mem.nap()
    assert report.status == "accepted" and sorted(report.consolidated) == [1, 2], report
    answers = [mem.ask(f.chat_question()) for f in FACTS]
    assert all(mentions(a, f.object) for a, f in zip(answers, FACTS)), answers
    digest = nf4.weights_digest()
    mem.close()
    again = make_nf4(home, config)  # a restart rebuilds the same weights
    assert nf4.weights_digest() == digest and [again.ask(f.chat_question()) for f in FACTS] == answers

    path = again.export_adapter(tmp_path / "export")
    if consolidation == "keyed":  # a keyed table exports as an approximate MEMIT solve (README): not compared
        return
    # The exported adapter on the same 4-bit base, in plain transformers + PEFT, answers alike.
    base = AutoModelForCausalLM.from_pretrained(again.lm.path, dtype=torch.float32, **loading_options("nf4", None))
    prepare(base)  # the float32 CPU path, as ours computes
    model = PeftModel.from_pretrained(base, str(path)).eval()
    tok = again.tokenizer
    theirs = [generate(model, tok, [encode(tok, chat_text(tok, f.chat_question()), chat=True)],
                       max_new_tokens=24)[0].strip() for f in FACTS]
    assert theirs == answers


def test_bad_scheme_or_missing_bitsandbytes_changes_nothing(nf4, lm, cache_dir, tmp_path, monkeypatch):
    from sleepwake.memory import Memory

    home = tmp_path / "home"
    with pytest.raises(InvalidRequestError, match="unknown quantization scheme 'int3'"):
        Memory(home=home, cache_dir=cache_dir, quantize="int3")
    with pytest.raises(InvalidRequestError, match="quantize='nf4', but the model given was loaded with quantize=None"):
        Memory(lm, home=home, cache_dir=cache_dir, quantize="nf4")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(InvalidRequestError, match=r"needs bitsandbytes.*pip install 'sleepwake\[quantize\]'"):
        Memory(home=home, cache_dir=cache_dir, quantize="nf4")
    assert not home.exists()
    proc = subprocess.run([sys.executable, "-m", "sleepwake.cli", "--home", str(home), "--quantize", "int3", "facts"],
                          capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert proc.returncode == 2 and "invalid choice: 'int3'" in proc.stderr and not home.exists()
