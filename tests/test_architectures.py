"""Every supported model family, on tiny randomly initialised models built here.

Each family gets a 4-layer model (hidden 64, MLP 128) with the default model's
tokenizer, saved as a local Hugging Face directory. We check that `load_model` finds
its decoder layers and MLP down-projection, that MEMIT writes a fictional fact into
it (a random model can be made to say anything), that the edit stays local, and
that a restart rebuilds bitwise the same weights. Then the errors for unsupported
architectures and for models that cannot be found.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from sleepwake.config import MemoryConfig
from sleepwake.errors import ModelNotFoundError, UnsupportedArchitectureError
from sleepwake.inference import encode, encode_target
from sleepwake.memit.trace import add_to_residual, run_capture
from sleepwake.memory import Memory
from sleepwake.models import ARCHITECTURES, default_layers, load_model, resolve_model

HIDDEN, INTER, N_LAYERS, HEADS = 64, 128, 4, 4

FACT = "Anselm Kreutzer | lives in | Lisbon"
PROMPT, TARGET = "Anselm Kreutzer lives in", " Lisbon"
UNRELATED = ["The weather today is quite", "My favourite book is about", "Water boils at a temperature of"]

# Random models are built with initializer_range 0.1 (transformers' default is
# 0.02): at 0.02 their next-token logits are almost flat (std 0.16 over 49k tokens),
# so no edit can move the target by more than ~0.7 logits and "greedy says the
# target" is decided by margins of 0.01-0.15. At 0.1 (logit std 0.8) an edit wins
# by 0.7-3.9 logits on every family and seed tried (0-5).
INIT_RANGE = 0.1
# Edit two middle layers of four, leaving one layer above v*. clamp_norm_factor 2
# (default 0.75): a random model's hidden state holds no signal to build on, and
# with ‖δ‖ ≤ 0.75‖h‖ phi3 and qwen3 miss the target by 0.1-0.3 logits. The
# covariance uses fewer texts, for speed. Keys at the last prompt token: with the
# default subject keys, one random attention layer would have to carry the edit from
# the subject to the end of the prompt (test_cached_prefix_passes_match_full_forward
# covers the subject-key machinery on every family; test_memory and test_gemma its
# effect on real models).
TEST_LAYERS = (1, 2)
SMALL = MemoryConfig(progress=False).with_memit(
    layers=TEST_LAYERS, cov_texts=40, cov_max_tokens=64, chat_edit=False, clamp_norm_factor=2.0,
    key_positions="last",
)


def _common(tok: Any) -> dict[str, Any]:
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return dict(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=pad,
        initializer_range=INIT_RANGE,
    )


def _llama_like(config_cls: Callable[..., Any], **extra: Any) -> Callable[[Any], Any]:
    def make(tok: Any) -> Any:
        return config_cls(
            hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=N_LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=512,
            **_common(tok), **extra,
        )

    return make


def _gpt2(tok: Any) -> Any:
    from transformers import GPT2Config

    return GPT2Config(n_embd=HIDDEN, n_inner=INTER, n_layer=N_LAYERS, n_head=HEADS, n_positions=512, **_common(tok))


def _configs() -> dict[str, Callable[[Any], Any]]:
    import transformers as tf

    head = dict(head_dim=HIDDEN // HEADS)  # these default to 128/256 wide heads
    return {
        "llama": _llama_like(tf.LlamaConfig),
        "mistral": _llama_like(tf.MistralConfig),
        "qwen2": _llama_like(tf.Qwen2Config),
        "qwen3": _llama_like(tf.Qwen3Config, **head),
        "gemma2": _llama_like(tf.Gemma2Config, query_pre_attn_scalar=HIDDEN // HEADS, **head),
        "gemma3_text": _llama_like(tf.Gemma3TextConfig, query_pre_attn_scalar=HIDDEN // HEADS, **head),
        "phi3": _llama_like(tf.Phi3Config),
        "gpt2": _gpt2,
    }


FAMILIES = list(_configs())


def build_tiny(
    make_config: Callable[[Any], Any], tokenizer: Any, path: Path, seed: int = 0,
    adjust: Callable[[torch.nn.Module], None] | None = None,
) -> Path:
    """A randomly initialised causal LM plus `tokenizer`, saved as an HF directory."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(tokenizer)).eval()
    if adjust is not None:
        with torch.no_grad():
            adjust(model)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@dataclass
class Tiny:
    family: str
    path: Path
    cache: Path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and on a busy 2-core machine torch's
    spinning worker threads make every step ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer(lm: Any) -> Any:
    return lm.tokenizer


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request: pytest.FixtureRequest, tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    family = request.param
    root = tmp_path_factory.mktemp(family)
    path = build_tiny(_configs()[family], tokenizer, root / "model")
    return Tiny(family, path, root / "cache")


# --- loading and the down-projection ----------------------------------------------


def test_load_finds_layers_and_down_projection(tiny: Tiny) -> None:
    lm = load_model(tiny.path, cache_dir=tiny.cache, progress=False)
    assert lm.arch.model_type == tiny.family
    assert lm.name == tiny.path.name and lm.fingerprint.startswith("hf-")
    assert lm.arch.n_layers == N_LAYERS
    assert lm.model.dtype == torch.float32 and not lm.model.training
    assert lm.default_layers() == default_layers(lm.name, N_LAYERS)
    assert all(0 <= l < N_LAYERS for l in lm.default_layers())
    for layer in range(N_LAYERS):
        w = lm.arch.down_weight(layer)
        assert w.shape == (HIDDEN, INTER)  # (d_out, d_in)
        assert (lm.arch.d_out(layer), lm.arch.d_in(layer)) == (HIDDEN, INTER)
        param = lm.arch.down_proj(layer).weight
        assert not param.requires_grad
        if tiny.family == "gpt2":  # Conv1D keeps (in, out); down_weight is its transpose
            assert type(lm.arch.down_proj(layer)).__name__ == "Conv1D"
            assert param.shape == (INTER, HIDDEN)
            assert torch.equal(w, param.data.t())
        else:
            assert param.shape == (HIDDEN, INTER)
        # A view, not a copy: writing through it is what edits the model.
        assert w.data_ptr() == param.data_ptr()
        old = param.data.clone()
        w[3, 5] += 1.0  # row = output unit 3, column = MLP unit 5
        assert int((param.data != old).sum()) == 1
        where = (5, 3) if tiny.family == "gpt2" else (3, 5)
        assert param.data[where] == old[where] + 1.0
        param.data.copy_(old)

    # The MEMIT key really is the down-projection's input: (batch, seq, d_in).
    from sleepwake.memit.trace import run_capture

    ids = torch.tensor([encode(lm.tokenizer, PROMPT)])
    keys, hid = run_capture(lm.model, lm.arch, {"input_ids": ids}, key_layers=(1,), hidden_layers=(1,))
    assert keys[1].shape == (1, ids.shape[1], INTER)
    assert hid[1].shape == (1, ids.shape[1], HIDDEN)


# --- MEMIT on each family -----------------------------------------------------------


def _next_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()


def _tv(a: torch.Tensor, b: torch.Tensor) -> float:
    """Total variation distance between the next-token distributions of two logit vectors."""
    return 0.5 * (a.softmax(-1) - b.softmax(-1)).abs().sum().item()


def test_memit_injection(tiny: Tiny, tmp_path: Path) -> None:
    home = tmp_path / "home"
    mem = Memory(tiny.path, home=home, config=SMALL, cache_dir=tiny.cache, progress=False)
    tok = mem.tokenizer
    prompt_ids = encode(tok, PROMPT)
    first = encode_target(tok, PROMPT, TARGET)[0]
    others = [encode(tok, p) for p in UNRELATED]
    before_edit = _next_logits(mem.model, prompt_ids)
    before = [_next_logits(mem.model, ids) for ids in others]
    assert before_edit.argmax().item() != first  # a random model does not know it yet

    result = mem.inject(FACT)
    assert len(result.records) == 1 and result.stats[0].n_slots >= 1
    # Each layer's keys were read in a pass that replayed the layers below the one
    # edited before it: they must be what the edited model reads there now.
    keys, _ = run_capture(mem.model, mem.lm.arch, {"input_ids": torch.tensor([prompt_ids])},
                          key_layers=TEST_LAYERS)
    stored = mem._edits[result.records[0].id].k
    for layer in TEST_LAYERS:
        assert torch.allclose(keys[layer][0, -1], stored[layer][0], atol=1e-5, rtol=1e-4), layer

    # Efficacy: the greedy completion starts with the target's first token.
    after_edit = _next_logits(mem.model, prompt_ids)
    assert after_edit.argmax().item() == first
    completion = mem.complete(PROMPT, max_new_tokens=3)
    assert completion.startswith(tok.decode([first])), completion

    # Locality, loosely: random models hardly tell prompts apart, so unrelated
    # prompts move too (total variation 0.02-0.24 over seeds 0-5), but less than
    # the edited one (0.29-0.48).
    tv_edit = _tv(after_edit, before_edit)
    tvs = [_tv(_next_logits(mem.model, ids), b) for ids, b in zip(others, before)]
    assert max(tvs) < 0.3, (tvs, tv_edit)
    assert sum(tvs) / len(tvs) < tv_edit, (tvs, tv_edit)

    # Restart: a new Memory on the same home rebuilds bitwise-identical weights.
    edited = [l for l in range(mem.lm.arch.n_layers) if not torch.equal(mem.lm.arch.down_weight(l),
                                                                          mem.lm.base_weight(l))]
    assert edited == list(TEST_LAYERS)
    weights = {l: mem.lm.arch.down_weight(l).clone() for l in range(mem.lm.arch.n_layers)}
    mem.close()
    again = Memory(tiny.path, home=home, config=SMALL, cache_dir=tiny.cache, progress=False)
    try:
        assert again.lm is not mem.lm
        assert [r.fact.object for r in again.facts()] == ["Lisbon"]
        for l, w in weights.items():
            assert torch.equal(again.lm.arch.down_weight(l), w), l
        assert again.complete(PROMPT, max_new_tokens=3) == completion
    finally:
        again.close()


@pytest.mark.parametrize("masks", [True, False], ids=["packed", "unmasked"])
def test_cached_prefix_passes_match_full_forward(tiny: Tiny, masks: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """v* re-runs only the suffix of each sequence after the first δ or read, on a
    copy of a KV cache of the prefix: rows that each pack the sequences of one δ, each
    sequence with a prefix of its own length (a 4-D mask and positions), or, where a
    model cannot take such masks (here: told so), one sequence per row after a prefix
    common to all rows and no mask. Its logits must equal each sequence run alone on
    every family (positions, masks, sliding windows), and the cache must come out
    untouched, since every step reuses it."""
    from dataclasses import replace

    from sleepwake.facts import Fact
    from sleepwake.memit import targets
    from sleepwake.memit.requests import build_requests
    from sleepwake.inference import head_logits
    from sleepwake.memit.targets import _groups, hidden_at, make_slots

    if not masks:
        monkeypatch.setattr(targets, "_segment_masks_ok", lambda model, length: False)
    lm = load_model(tiny.path, cache_dir=tiny.cache, progress=False)
    cfg = replace(SMALL.memit, key_positions="subject", chat_edit=True)
    facts = [Fact("Anselm Kreutzer", "lives in", "Lisbon"), Fact("Anselm Kreutzer", "works as a", "carpenter"),
             Fact("Zofia Wróblewska", "was born in", "Kraków")]
    requests = build_requests(facts, lm.tokenizer, cfg)
    slots = make_slots(requests, cfg, lm.device)
    assert slots.delta.tolist() == [0, 0, 0, 0, 1, 1]  # one δ per subject (raw and chat requests)
    groups = _groups(lm.model, lm.arch, requests, slots, True, 1, 0, lm.device)
    assert any(g.prefix_cache is not None for g in groups)
    # Packed: a row per δ. Unmasked: a row per sequence (6 requests, 2 KL prompts).
    assert sum(len(g.batch["input_ids"]) for g in groups) == (2 if masks else 8)
    assert all(("attention_mask" in g.batch) == masks for g in groups)
    assert sum(len(g.o_rows) for g in groups) == sum(len(q.target) for q in requests) + 2
    for g in groups:
        with torch.no_grad():
            first = head_logits(lm.model, hidden_at(lm.model, g.inputs(), g.o_rows, g.o_cols))
            again = head_logits(lm.model, hidden_at(lm.model, g.inputs(), g.o_rows, g.o_cols))
            assert torch.equal(first, again)  # the cache was not extended in place
            ids = g.batch["input_ids"]
            full = ids if g.prefix_ids is None else torch.cat([g.prefix_ids, ids], dim=1)
            shift = full.shape[1] - ids.shape[1]
            for i, (row, col) in enumerate(zip(g.o_rows.tolist(), g.o_cols.tolist())):
                if masks:
                    seen = g.batch["attention_mask"][row, 0, col]
                    real = full[row][seen if seen.dtype == torch.bool else seen == 0]  # the tokens the read sees
                else:  # right-padded rows: the row up to the read
                    real = full[row, : shift + col + 1]
                ref = lm.model(input_ids=real[None], use_cache=False).logits[0, -1].float()
                assert torch.allclose(first[i], ref, atol=1e-4, rtol=1e-4), (first[i] - ref).abs().max()


def test_bf16_phase_casts_the_matmuls_above_the_layer_and_restores_the_weights(tiny: Tiny) -> None:
    """v*'s bf16 steps: inside `bf16_above`, the linear maps above the edited layer
    and the LM head hold bf16 weights while everything else stays float32, outputs
    and gradients come out float32 and close to the float32 ones; on exit, even
    through an exception, every weight is bitwise what it was."""
    from sleepwake.inference import head_logits
    from sleepwake.memit.targets import bf16_above, hidden_at

    lm = load_model(tiny.path, cache_dir=tiny.cache, progress=False)
    model, layer = lm.model, TEST_LAYERS[-1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([encode(lm.tokenizer, PROMPT)])
    rows, cols = torch.tensor([0]), torch.tensor([ids.shape[1] - 1])

    def logits_and_grad() -> tuple[torch.Tensor, torch.Tensor]:
        delta = torch.zeros(lm.arch.d_out(layer), requires_grad=True)
        with add_to_residual(lm.arch, layer, rows, cols, delta[None]):
            logits = head_logits(model, hidden_at(model, {"input_ids": ids}, rows, cols))
        logits.log_softmax(-1)[0, 0].backward()
        return logits.detach(), delta.grad

    ref, ref_grad = logits_and_grad()
    with pytest.raises(KeyboardInterrupt):
        with bf16_above(model, lm.arch, layer):
            assert lm.arch.down_proj(layer + 1).weight.dtype == torch.bfloat16
            assert model.get_output_embeddings().weight.dtype == torch.bfloat16
            assert lm.arch.down_proj(layer).weight.dtype == torch.float32  # at and below: untouched
            got, grad = logits_and_grad()
            assert got.dtype == grad.dtype == torch.float32
            assert (got - ref).abs().max() < 0.05 * ref.abs().max()
            assert torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0) > 0.99
            raise KeyboardInterrupt  # an interrupted injection
    after = model.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())
    assert torch.equal(logits_and_grad()[0], ref)


def _gemma_post_norm_gains(model: torch.nn.Module) -> None:
    """Give the post-MLP norms per-channel gains (1 + w) in (0, 11), as trained Gemmas
    have (Gemma-3-270M: 0 to ~600, on MLP outputs of norm ~3); random init has 1."""
    gen = torch.Generator().manual_seed(1)
    for layer in model.model.layers:
        w = layer.post_feedforward_layernorm.weight
        w.copy_(torch.rand(w.shape, generator=gen) * 11 - 1)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_post_mlp_norm_edit_stays_local(family: str, tokenizer: Any, tmp_path: Path) -> None:
    """Gemma 2/3 normalise the MLP output before the residual add. An edit that writes
    the residual change straight into the down-projection ignores the norm's gains
    and spills onto every prompt: unrelated prompts then move as much as the edited
    one (total variation 0.28-0.39 against 0.31-0.37, seeds 0-3). Mapped through the
    norm, they move 0.01-0.05."""
    path = build_tiny(_configs()[family], tokenizer, tmp_path / "model", adjust=_gemma_post_norm_gains)
    mem = Memory(path, home=tmp_path / "home", config=SMALL, cache_dir=tmp_path / "cache", progress=False)
    try:
        tok = mem.tokenizer
        prompt_ids = encode(tok, PROMPT)
        first = encode_target(tok, PROMPT, TARGET)[0]
        others = [encode(tok, p) for p in UNRELATED]
        before_edit = _next_logits(mem.model, prompt_ids)
        before = [_next_logits(mem.model, ids) for ids in others]
        mem.inject(FACT)
        after_edit = _next_logits(mem.model, prompt_ids)
        gain = (after_edit[first] - before_edit[first]).item()
        assert gain > 2.0  # the edit took (3.5-4.6 logits, seeds 0-3)
        tv_edit = _tv(after_edit, before_edit)
        tvs = [_tv(_next_logits(mem.model, ids), b) for ids, b in zip(others, before)]
        assert max(tvs) < 0.15, (tvs, tv_edit)
        assert max(tvs) < 0.5 * tv_edit, (tvs, tv_edit)
    finally:
        mem.close()


# --- errors -------------------------------------------------------------------------


def test_unsupported_architecture(tokenizer: Any, tmp_path: Path) -> None:
    from transformers import GPTNeoXConfig

    def make(tok: Any) -> Any:
        return GPTNeoXConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
                             num_attention_heads=HEADS, max_position_embeddings=128, **_common(tok))

    path = build_tiny(make, tokenizer, tmp_path / "neox")
    with pytest.raises(UnsupportedArchitectureError) as err:
        load_model(path, cache_dir=tmp_path / "cache", progress=False)
    msg = str(err.value)
    assert "'gpt_neox'" in msg and "supported" in msg
    for model_type in ARCHITECTURES:
        assert model_type in msg


def test_resolve_nonexistent_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="no-such-model") as err:
        resolve_model(missing)
    assert "not a .gguf file" in str(err.value) and "local model directory" in str(err.value)
    with pytest.raises(ModelNotFoundError):  # the same through load_model and Memory
        load_model(missing, cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(ModelNotFoundError):
        Memory(str(missing), home=tmp_path / "home", cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "home").exists()


def test_resolve_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        resolve_model(tmp_path / "empty")


def test_resolve_non_gguf_file(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ModelNotFoundError, match=r"not a \.gguf model"):
        resolve_model(f)


def test_resolve_garbage_gguf_file(tmp_path: Path) -> None:
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"this is not a gguf file")
    assert resolve_model(f).kind == "gguf"  # the name fits; loading it must fail cleanly
    with pytest.raises(ModelNotFoundError, match="cannot load GGUF"):
        load_model(f, cache_dir=tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache").rglob("config.json"))  # nothing half-converted is cached


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """HF offline, and any socket connection recorded and refused."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any, *a: Any, **k: Any) -> None:
        attempts.append(address)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_resolve_uncached_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[Any]) -> None:
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError, match="local Hugging Face cache") as err:
        resolve_model("sleepwake-tests/not-a-cached-model")
    assert "'sleepwake-tests/not-a-cached-model'" in str(err.value)
    assert no_network == []


def test_resolve_cached_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[Any]) -> None:
    """A hub id already in the local cache resolves to its snapshot, offline."""
    import huggingface_hub.constants as hub_constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--sleepwake-tests--tiny"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit, encoding="utf-8")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    src = resolve_model("sleepwake-tests/tiny")
    assert src.kind == "hf" and src.name == "sleepwake-tests/tiny"
    assert src.path.resolve() == snap.resolve()
    assert no_network == []


# --- one cache, several processes ---------------------------------------------------

_COMPUTE_COVARIANCE = """
import sys, time
from pathlib import Path
import sleepwake.memit.covariance as cov
from sleepwake.models import load_model

real = cov.compute_covariance

def slow(*args, **kwargs):
    print("computed", flush=True)
    time.sleep(3)  # without a lock, the other process would start computing in this window
    return real(*args, **kwargs)

cov.compute_covariance = slow
lm = load_model(sys.argv[1], cache_dir=sys.argv[2], progress=False)
c = cov.load_or_compute(lm.model, lm.arch, lm.tokenizer, (0, 1), fingerprint=lm.fingerprint,
                        cache_dir=Path(sys.argv[2]), n_texts=8, max_tokens=16, progress=False)
print("layers", sorted(c))
"""


def test_two_processes_compute_the_covariance_once(tokenizer: Any, tmp_path: Path) -> None:
    """Two processes on one cache (the two test workers, a CLI beside a server): one
    computes Ĉ, the other waits for it and loads it."""
    import os
    import subprocess
    import sys

    path = build_tiny(_configs()["llama"], tokenizer, tmp_path / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _COMPUTE_COVARIANCE, str(path), str(tmp_path / "cache")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert all("layers [0, 1]" in out for out, _ in outs)
    assert sum(out.count("computed") for out, _ in outs) == 1


def test_lora_loss_reads_the_head_where_the_full_logits_would(tiny: Tiny) -> None:
    """The LoRA loss runs the LM head only at answer tokens and along examples with a
    teacher; it must equal the loss over the full logits (cross-entropy on the answers,
    KL to the teacher at every position of its examples)."""
    from torch import nn

    from sleepwake.sleep.lora import Example, _batch, _loss, soft_targets

    lm = load_model(tiny.path, cache_dir=tiny.cache, progress=False)
    examples = [Example((5, 6, 7, 8), (9, 10)), Example((11, 12), (13, 14, 15)), Example((16, 17, 18, 19, 20), (21,))]
    teacher = soft_targets(lm.model, examples[1:2], pad_id=0, k=8)[0]
    soft = [None, teacher, None]
    batch = _batch(examples, 0, lm.device)
    with torch.no_grad():
        got = _loss(lm.model, batch, soft, kl_weight=0.7)
        logits = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        n = teacher.index.shape[0]
        student = torch.log_softmax(logits[1, :n], dim=-1).gather(1, teacher.index)
        kl = (teacher.logp.exp() * (teacher.logp - student)).sum() / n
    assert torch.allclose(got, ce + 0.7 * kl, rtol=1e-5, atol=1e-6), (got, ce + 0.7 * kl)
