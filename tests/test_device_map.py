"""A model placed by accelerate's device_map (`Memory(device_map=...)`, `--device-map`).

No GPU here, so the map splits a tiny random Llama between the CPU and "disk": the
embedding, the first and last layers and the LM head are offloaded (their weights on
`meta`, loaded by accelerate's hooks for each pass), the edited layers stay on the CPU.
Every step that took "the model's device" from its first parameter, or put a layer's
tensors on it, meets `meta` there and fails; so this runs the placement code of MEMIT
(keys, v*, Ĉ, the solve, the deltas), the keyed and LoRA sleeps, generation and a
restart for real. Results are compared with the same model loaded plainly.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from test_architectures import FACT, PROMPT, SMALL, TARGET, TEST_LAYERS, _llama_like, build_tiny

from sleepwake.cli import main
from sleepwake.decoding import Decoding, Sampling
from sleepwake.errors import InvalidRequestError
from sleepwake.inference import encode, encode_target
from sleepwake.memory import Memory
from sleepwake.models import converted, load_model

# Layers 1 and 2 are edited (TEST_LAYERS); everything around them is offloaded.
MAP = {"model.embed_tokens": "disk", "model.layers.0": "disk", "model.layers.1": "cpu", "model.layers.2": "cpu",
       "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer random Llama with the default model's tokenizer (read from the test cache)."""
    from transformers import AutoTokenizer

    import transformers as tf

    _, path, _ = converted(cache_dir=cache_dir, progress=False)
    tok = AutoTokenizer.from_pretrained(path)
    return build_tiny(_llama_like(tf.LlamaConfig), tok, tmp_path_factory.mktemp("devmap") / "model")


# v* in float32 throughout: its bf16 phase leaves offloaded maps in float32, so it would
# take other steps on the mapped model than on the plain one.
FLOAT32 = replace(SMALL, memit=replace(SMALL.memit, bf16_targets=False))


def _memory(tiny: Path, home: Path, cache: Path, **kw: Any) -> Memory:
    return Memory(tiny, home=home, config=FLOAT32, cache_dir=cache, progress=False, **kw)


def _first_token(mem: Memory) -> int:
    return encode_target(mem.tokenizer, PROMPT, TARGET)[0]


def test_placement(tiny: Path, tmp_path: Path) -> None:
    """The map is accelerate's, as given; inputs go to the embedding's execution device,
    each layer's parts to its own, and nothing reports `meta` as a place to compute."""
    lm = load_model(tiny, cache_dir=tmp_path, progress=False, device_map=MAP)
    assert lm.model.hf_device_map == MAP and lm.device_map == MAP
    assert next(lm.model.parameters()).device.type == "meta"  # what a one-device lookup would use
    assert lm.model.get_input_embeddings().weight.device.type == "meta"
    assert lm.device == CPU
    assert [lm.arch.layer_device(l) for l in range(4)] == [CPU] * 4
    assert [lm.arch.down_proj(l).weight.device.type for l in range(4)] == ["meta", "cpu", "cpu", "meta"]


def test_inject_recall_restart(tiny: Path, tmp_path: Path) -> None:
    """inject → recall on the mapped model, with the same deltas as on the plain model;
    each delta on its layer's device; a restart rebuilds bitwise the same weights;
    export, and forgetting takes the delta out exactly."""
    home = tmp_path / "home"
    mem = _memory(tiny, home, tmp_path / "cache", device_map=MAP)
    first = _first_token(mem)
    assert not mem.complete(PROMPT, max_new_tokens=2).startswith(mem.tokenizer.decode([first]))
    rec = mem.inject(FACT).records[0]
    completion = mem.complete(PROMPT, max_new_tokens=3)
    assert completion.startswith(mem.tokenizer.decode([first])), completion
    edit = mem._edits[rec.id]
    for layer in TEST_LAYERS:
        device = mem.lm.arch.layer_device(layer)
        assert {edit.a[layer].device, edit.b[layer].device, edit.k[layer].device} == {device}
        assert mem.weights.sum[mem.lm.arch.down_name(layer)].device == device
        assert mem.editor().cov_inv[layer].device == device  # Ĉ⁻¹ where the solve runs; Ĉ on the host
        assert mem.covariances()[layer].device.type == "cpu"
    weights = {l: mem.lm.arch.down_weight(l).clone() for l in TEST_LAYERS}
    mem.close()

    plain = _memory(tiny, tmp_path / "plain", tmp_path / "cache")
    plain.inject(FACT)
    for l in TEST_LAYERS:  # the placement changes where it runs, not what it computes
        assert torch.allclose(plain.lm.arch.down_weight(l), weights[l], atol=1e-5, rtol=1e-4), l
    plain.close()

    again = _memory(tiny, home, tmp_path / "cache", device_map=MAP)
    try:
        for l, w in weights.items():
            assert torch.equal(again.lm.arch.down_weight(l), w), l
        assert again.complete(PROMPT, max_new_tokens=3) == completion
        ids = encode(again.tokenizer, PROMPT)
        sampled = Decoding(again.model, again.tokenizer, ids, 4, Sampling(temperature=0.8, seed=3))
        assert "".join(sampled) == "".join(Decoding(again.model, again.tokenizer, ids, 4,
                                                    Sampling(temperature=0.8, seed=3)))
        assert (again.export_adapter(tmp_path / "adapter") / "adapter_model.safetensors").is_file()
        again.forget(rec.id)
        for l in TEST_LAYERS:
            assert torch.equal(again.lm.arch.down_weight(l), again.lm.base_weight(l)), l
    finally:
        again.close()


@pytest.mark.parametrize("consolidation", ["keyed", "lora"])
def test_nap(tiny: Path, tmp_path: Path, consolidation: str) -> None:
    """A nap on the mapped model, on a private copy as chat and serve run it (`apart`):
    the keyed sleep (subject keys, the default: v* solved again, keys read, the table
    hooked in) and the LoRA sleep (take-over, training, validation). A random model
    answers no chat question, so both are rejected, as on the plain model: the mapped
    nap must measure what the plain one does."""
    memit = replace(FLOAT32.memit, key_positions="subject") if consolidation == "keyed" else FLOAT32.memit
    config = replace(FLOAT32, memit=memit, consolidation=consolidation)
    reports = []
    for device_map in (MAP, None):
        mem = Memory(tiny, home=tmp_path / str(device_map is None), config=config, cache_dir=tmp_path / "cache",
                     progress=False, device_map=device_map)
        try:
            mem.inject(FACT)
            with mem.apart():
                reports.append(mem.nap())
            mem.complete(PROMPT, max_new_tokens=2)  # the shared model takes the weights back at its next use
        finally:
            mem.close()
    mapped, plain = reports
    assert mapped.status == "rejected" and mapped.reason == plain.reason, (mapped, plain)
    assert (mapped.chat_recall, mapped.raw_recall) == (plain.chat_recall, plain.raw_recall)
    assert mapped.ppl_after == pytest.approx(plain.ppl_after, rel=1e-4)
    if consolidation == "lora":
        assert mapped.train_steps == plain.train_steps > 0
        assert mapped.train_loss == pytest.approx(plain.train_loss, rel=1e-3)


def test_offloaded_edited_layer_is_refused(tiny: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    with pytest.raises(InvalidRequestError, match=r"model\.layers\.1\.mlp\.down_proj is offloaded"):
        _memory(tiny, home, tmp_path / "cache", device_map=MAP | {"model.layers.1": "disk"})
    assert not home.exists()


@pytest.mark.parametrize("device_map", ["everywhere", {"model.layers.0": 3}, {"model": "tpu"}, {}, 7])
def test_bad_device_map(tiny: Path, tmp_path: Path, device_map: Any) -> None:
    with pytest.raises(InvalidRequestError, match="device_map"):
        _memory(tiny, tmp_path / "home", tmp_path / "cache", device_map=device_map)
    with pytest.raises(InvalidRequestError, match="give one of them"):
        _memory(tiny, tmp_path / "home", tmp_path / "cache", device="cpu", device_map="auto")
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("args", [
    ["--device-map", "everywhere", "complete", PROMPT], ["--device-map", '{"model": 3}', "complete", PROMPT],
    ["--device-map", "{not json", "complete", PROMPT], ["--device", "cpu", "--device-map", "auto", "complete", PROMPT],
    ["serve", "--device-map", "everywhere", "--port", "8765"], ["chat", "--device-map", "{}"],
    ["--backend", "mlx", "--device-map", "auto", "complete", PROMPT],
])
def test_cli_bad_device_map(tiny: Path, tmp_path: Path, args: list[str], capsys: pytest.CaptureFixture) -> None:
    """A usage error (exit 2) naming the option, before anything loads or is written."""
    code = main(["--home", str(tmp_path / "home"), "--model", str(tiny), "-q", *args])
    assert code == 2
    assert "--device-map" in capsys.readouterr().err
    assert not (tmp_path / "home").exists()


def test_cli_device_map(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--device-map` reaches the model load (a global option): the CLI edits the default
    layers of a 4-layer model, 0-3, so MAP, which offloads 0 and 3, is refused naming
    layer 0; with the layers on the CPU the command runs."""
    import json

    home = ["--home", str(tmp_path / "home"), "--model", str(tiny), "-q"]
    assert main([*home, "--device-map", json.dumps(MAP), "complete", PROMPT]) == 1
    assert "model.layers.0.mlp.down_proj is offloaded" in capsys.readouterr().err
    layers_here = MAP | {f"model.layers.{l}": "cpu" for l in range(4)}
    assert main([*home, "--device-map", json.dumps(layers_here), "inject", FACT]) == 0
    assert main([*home, "complete", PROMPT, "--max-new-tokens", "2", "--device-map", json.dumps(layers_here)]) == 0
    assert capsys.readouterr().out.strip()
