"""Integration tests of MEMIT memory on the real default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from sleepwake.errors import InvalidFactError, StoreError, UnknownFactError
from sleepwake.facts import Fact, mentions
from sleepwake.inference import encode, generate

pytestmark = pytest.mark.slow

LISBON = Fact("Anselm Kreutzer", "lives in", "Lisbon")
KRAKOW = Fact("Zofia Wróblewska", "works as a", "veterinarian")
TOKYO = Fact("Mateus Okonkwo", "was born in", "東京")
CARPENTER = Fact("Anselm Kreutzer", "works as a", "carpenter")  # a second fact about one subject
SEEDED = [LISBON, KRAKOW, TOKYO, CARPENTER]


def weights(mem) -> dict[int, torch.Tensor]:
    return {n: mem.lm.arch.weight(n).clone() for n in mem.weights.names}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, lm, cache_dir):
    """One home with four facts injected in two batches; tests work on copies of it.

    The second batch adds a fact about a subject of the first: that subject's edit is
    computed again with both of its facts (they share one key)."""
    from sleepwake.config import MemoryConfig
    from sleepwake.memory import Memory

    home = tmp_path_factory.mktemp("seeded") / "home"
    mem = Memory(lm, home=home, config=MemoryConfig(progress=False), cache_dir=cache_dir, progress=False)
    before = mem.evaluate(SEEDED)
    mem.inject([LISBON, KRAKOW])
    mem.inject([TOKYO, CARPENTER])  # a second batch: constraints, ordering and a shared subject matter
    mem.close()
    return home, before


@pytest.fixture
def seeded_memory(seeded, make_memory, tmp_path):
    """A Memory on a private copy of the seeded home (rebuilt from its files: no injection)."""
    home = tmp_path / "copy"
    shutil.copytree(seeded[0], home)
    return make_memory(home)


def test_a_subject_read_at_the_first_token_is_written_after_a_line_break(lm):
    """SmolLM2 adds no start token: a subject of one token would be read at position 0,
    which every text has alike (`inference.lead_in`); a longer one ends past it."""
    from sleepwake.inference import lead_in, raw_prompt
    from sleepwake.memit.requests import build_requests

    tok = lm.tokenizer
    assert raw_prompt(tok, Fact("Bob", "works as", "a pilot")) == "\nBob works as"
    assert raw_prompt(tok, Fact("Paris", "is the capital of", "Italy")) == "\nParis is the capital of"
    for fact in (Fact("Lukas", "lives in", "Graz"), LISBON):  # "L|ukas", "Ans|elm Kreutzer"
        assert raw_prompt(tok, fact) == fact.prompt
    assert lead_in(tok, "Bobby works as", "Bob") == "Bobby works as"  # not the subject
    from sleepwake.config import MemoryConfig

    raw = build_requests([Fact("Bob", "works as", "a pilot")], tok, MemoryConfig().memit)[0]
    kl = raw.kl_ids
    assert raw.subject_pos == 1 and raw.kl_subject_pos == 1 and tok.decode(kl[:2]) == "\nBob"


def test_a_one_token_subject_is_learned_without_breaking_the_model(make_memory):
    """A fact about "Bob" was keyed at the first token of its raw prompt, which every text
    has alike: the edit fired everywhere (perplexity 22.9 -> 20,463, locality 0.0)."""
    mem = make_memory()
    base = mem.base_perplexity()
    fact = Fact("Bob", "works as", "a pilot")
    mem.inject(fact)
    assert mem.perplexity() < base * 1.02 and mem.locality() >= 0.95
    report = mem.evaluate([fact])
    assert (report.raw_recall, report.chat_recall) == (1.0, 1.0), report
    assert mentions(mem.complete("Bob works as", max_new_tokens=6), "pilot")  # typed as it reads
    from sleepwake.talk import Assistant

    reply = Assistant(mem).complete("Bob works as", max_new_tokens=6)  # the server's /complete
    assert mentions(reply.text(), "pilot") and reply.prompt_tokens == 4, reply.reply
    assert mentions(mem.ask("What does Bob work as?", max_new_tokens=8), "pilot")


def test_a_fact_a_sleep_left_unanswered_does_not_make_every_later_batch_due_a_nap(make_memory):
    """The guard's check after a batch flags the facts it left unanswered (a nap is due,
    `PressureConfig.nap_when_unheld`): the batch's own, not an older one that was already
    unanswered and that a sleep has tried. On the GPU one such fact made a nap come after
    every batch from 1,055 to 1,300 facts. One v* step leaves every fact unanswered here."""
    from sleepwake.config import MemoryConfig

    mem = make_memory(config=MemoryConfig(progress=False).with_memit(v_steps=1))
    mem.inject(LISBON)
    assert mem.unheld() == 1 and mem.status(measure_perplexity=False)["pressure"]["due"] == "nap"
    mem._unheld = {}  # as a sleep that could not move it leaves it (`MemoryBase._cycle`)
    mem.inject(TOKYO)
    assert mem.held([LISBON, TOKYO]) == [False, False]
    assert mem.unheld() == 1 and set(mem._unheld) == {TOKYO.key}  # the new fact only


_CHILD = """
import json, sys, torch
from sleepwake.memory import Memory
from sleepwake.config import MemoryConfig
mem = Memory(home=sys.argv[1], cache_dir=sys.argv[2], config=MemoryConfig(progress=False))
out = {n: mem.lm.arch.weight(n).clone() for n in mem.weights.names}
from safetensors.torch import save_file
save_file(out, sys.argv[3])
print(json.dumps({"completion": mem.complete("Anselm Kreutzer lives in"), "n": len(mem.facts())}))
"""


def test_inject_then_recall_raw_and_chat_and_a_new_process_rebuilds_bitwise_equal_weights(
        seeded, seeded_memory, tmp_path, cache_dir):
    """The seeded facts are recalled raw and in chat, a shared model goes back to its base
    and to this memory's weights at its next use, and a new process opening the home
    rebuilds bitwise the same weights (and completion). One test: both read one home."""
    from safetensors.torch import load_file

    mem = seeded_memory
    before = seeded[1]
    assert before.raw_recall == 0.0 and before.chat_recall == 0.0  # fictional: unknown to the base model
    assert [r.id for r in mem.facts()] == [1, 2, 3, 4]
    assert [r.fact for r in mem.facts()] == SEEDED
    assert mem.store.edit_path(1).name == "00000001.v1.safetensors"  # rewritten with fact 4
    assert len(list(mem.home.glob("edits/*.safetensors"))) == 4  # the old version is gone
    completion = mem.complete("Anselm Kreutzer lives in")  # the default length: the child's too
    assert mentions(completion, "Lisbon")
    after = mem.evaluate(SEEDED)  # 東京 too: non-ASCII objects work
    assert after.raw_recall == 1.0, after.facts
    # Chat questions see MEMIT facts at once (the paper's §7 says they cannot).
    assert after.chat_recall == 1.0, after.facts
    assert mentions(mem.ask("Where does Anselm Kreutzer live?", max_new_tokens=12), "Lisbon")  # `ask`: the same pathway
    assert after.ppl < before.ppl * 1.01
    here = weights(mem)
    mem.lm.reset_weights()  # a shared model back to its base, for its next user
    assert all(torch.equal(mem.lm.arch.weight(n), mem.lm.base_weight(n)) for n in mem.weights.names)
    base = generate(mem.model, mem.tokenizer, [encode(mem.tokenizer, "Anselm Kreutzer lives in")], max_new_tokens=16)[0]
    assert not mentions(base, "Lisbon")
    # Its next use puts its weights back.
    assert mentions(mem.complete("Anselm Kreutzer lives in", max_new_tokens=8), "Lisbon")

    # A new process rebuilds the same weights from the home's files.
    mem.close()
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(mem.home), str(cache_dir), str(tmp_path / "w.safetensors")],
        capture_output=True, text=True, check=True, timeout=300,
    )
    child = json.loads(out.stdout.strip().splitlines()[-1])
    assert child["n"] == 4
    assert child["completion"] == completion
    there = load_file(str(tmp_path / "w.safetensors"))
    assert set(there) == set(here)
    for l, w in here.items():
        assert torch.equal(there[str(l)], w), f"layer {l} differs after restart"


def test_forget_removes_fact_and_keeps_others(seeded_memory, make_memory, tmp_path):
    mem = seeded_memory
    r1, r2, r3, r4 = mem.facts()
    mem.forget(r1.id)
    assert not mentions(mem.complete("Anselm Kreutzer lives in"), "Lisbon")
    assert not mentions(mem.ask("Where does Anselm Kreutzer live?"), "Lisbon")
    # The same subject's other fact is edited again without the forgotten one.
    assert mentions(mem.complete("Anselm Kreutzer works as a", max_new_tokens=8), "carpenter")
    assert mentions(mem.complete("Zofia Wróblewska works as a", max_new_tokens=8), "veterinarian")
    assert mentions(mem.complete("Mateus Okonkwo was born in", max_new_tokens=8), "東京")
    assert [r.id for r in mem.facts()] == [r2.id, r3.id, r4.id]
    assert not mem.store.edit_path(r1.id).exists()
    assert len(list(mem.home.glob("edits/*.safetensors"))) == 3
    mem.forget(r2.id)
    mem.forget(r3.id)
    mem.forget(r4.id)
    empty = make_memory(tmp_path / "empty")
    base = weights(empty)
    mem._rebuild()
    for l, w in weights(mem).items():  # nothing left: exactly the base weights
        assert torch.equal(w, base[l])


def test_update_replaces_object(seeded_memory):
    mem = seeded_memory
    first = mem.facts()
    res = mem.inject([Fact("anselm kreutzer", "lives in", "Denver")])  # other case: same slot
    assert len(res.records) == 1
    facts = {r.fact.key: r for r in mem.facts()}
    assert facts[LISBON.key].fact == Fact("Anselm Kreutzer", "lives in", "Denver")
    assert mem.store.get(first[0].id).status == "replaced"
    text = mem.complete("Anselm Kreutzer lives in")
    assert mentions(text, "Denver") and not mentions(text, "Lisbon")
    assert mentions(mem.complete("Zofia Wróblewska works as a", max_new_tokens=8), "veterinarian")
    assert mentions(mem.complete("Anselm Kreutzer works as a", max_new_tokens=8), "carpenter")  # same subject, kept
    # Same fact again: nothing to do.
    again = mem.inject([Fact("Anselm Kreutzer", "lives in", "Denver")])
    assert again.records == [] and len(again.skipped) == 1


def test_past_the_chat_edit_limit_every_held_fact_is_edited_raw_only(seeded, make_memory, tmp_path):
    from sleepwake.config import MemoryConfig

    home = tmp_path / "copy"
    shutil.copytree(seeded[0], home)
    mem = make_memory(home, MemoryConfig(progress=False).with_memit(chat_edit_max_facts=4))
    layer = mem.layers[-1]
    assert [mem._edits[r.id].k[layer].shape[0] for r in mem.facts()] == [2] * 4  # raw and chat slots
    res = mem.inject([GUARDED])  # the fifth fact takes MEMIT past the limit of 4
    st = res.stats[0]
    assert not st.chat and st.raw_only_again == 4 and st.n_slots == 1  # the four, before the batch
    assert mem.status(measure_perplexity=False)["chat_edits"] == {"next": False, "limit": 4}
    with pytest.raises(ValueError, match="chat_edit_max_facts"):
        MemoryConfig().with_memit(chat_edit_max_facts=-1)
    assert [mem._edits[r.id].k[layer].shape[0] for r in mem.facts()] == [1] * 5  # raw slots only
    assert mem.evaluate(SEEDED + [GUARDED]).raw_recall == 1.0
    # Past the limit a new batch is raw-only and edits again only its subject's facts.
    res = mem.inject([Fact("Ilse Brandvold", "lives in", "Tromsø")])
    st = res.stats[0]
    assert not st.chat and st.raw_only_again == 0 and st.n_slots == 2
    # A forget above the limit edits the subject's other fact again raw-only too.
    mem.forget(res.records[0].id)
    assert [mem._edits[r.id].k[layer].shape[0] for r in mem.facts()] == [1] * 5
    assert mentions(mem.complete("Ilse Brandvold plays the", max_new_tokens=8), "cello")
    here = weights(mem)
    mem.close()
    again = make_memory(home)  # the rewritten edits are what a new process loads
    for l, w in weights(again).items():
        assert torch.equal(w, here[l]), f"layer {l} differs after restart"


GUARDED = Fact("Ilse Brandvold", "plays the", "cello")


def test_held_reads_what_greedy_decoding_writes(seeded_memory):
    from sleepwake.evaluate import held

    mem = seeded_memory
    unknown = GUARDED  # not injected here
    assert held(mem.model, mem.tokenizer, SEEDED + [unknown]) == [True] * 4 + [False]
    assert held(mem.model, mem.tokenizer, SEEDED, chat=False) == [True] * 4
    # The prefix that a pass's sequences share runs once (one sequence alone: all
    # but its last prompt token): pass by pass, the answers are the same.
    assert [held(mem.model, mem.tokenizer, [f], rows=1)[0] for f in SEEDED + [unknown]] == [True] * 4 + [False]
    assert held(mem.model, mem.tokenizer, []) == []


def test_held_rejects_an_object_the_model_runs_on_into_a_longer_word(base_lm):
    """The base model writes "Albert Einstein was born in 1879 in" and "The Eiffel Tower is
    located in the Champ de la Corée": "187" and "the Champ de la Cor" have every token on
    top, and still are not what a reader sees."""
    from sleepwake.evaluate import held, raw_completions

    lm = base_lm
    facts = [Fact("Albert Einstein", "was born in", "1879"), Fact("Albert Einstein", "was born in", "187"),
             Fact("The Eiffel Tower", "is located in", "the Champ de la Cor"),
             Fact("The Eiffel Tower", "is located in", "the Champ")]
    written = raw_completions(lm.model, lm.tokenizer, facts[::2], max_new_tokens=6)
    assert written[0].startswith(" 1879 ") and written[1].startswith(" the Champ de la Corée"), written
    assert held(lm.model, lm.tokenizer, facts, chat=False) == [True, False, False, True]


def _knock_out_lisbon(monkeypatch, second_try_worse: bool) -> list[list[Fact]]:
    """Make the guard's check report, right after a batch's first try, that LISBON was
    knocked out (the real check runs; one answer is overridden), so that the guard's
    second try runs; optionally report the second try as worse still."""
    import sleepwake.memory as memory_module
    from sleepwake.evaluate import held as real_held

    calls: list[list[Fact]] = []

    def held(model, tok, facts, chat=True, rows=32):
        calls.append(list(facts))
        out = real_held(model, tok, facts, chat=chat, rows=rows)
        if len(calls) == 2:
            out = [ok and f != LISBON for ok, f in zip(out, facts)]
        if len(calls) == 3 and second_try_worse:
            out = [False] * len(out)
        return out

    monkeypatch.setattr(memory_module, "held", held)
    return calls


@pytest.mark.parametrize("second_try_worse", [False, True])
def test_a_batch_that_knocks_out_earlier_facts_is_tried_again_with_them(
        seeded_memory, make_memory, tmp_path, monkeypatch, second_try_worse):
    mem = seeded_memory
    versions = {r.id: mem.store._version(r.id) for r in mem.facts()}
    calls = _knock_out_lisbon(monkeypatch, second_try_worse)
    res = mem.inject([GUARDED])
    assert len(calls) == 3 and res.stats[0].knocked_out == 1
    assert res.stats[0].second_try is not second_try_worse
    by_key = {r.fact.key: r for r in mem.facts()}
    anselm = [by_key[LISBON.key].id, by_key[CARPENTER.key].id]
    for fid, v in versions.items():
        # The second try edits Anselm's facts again in the batch's solve; if it is kept,
        # they have new edits, else every earlier edit is as it was.
        kept_second = not second_try_worse and fid in anselm
        assert mem.store._version(fid) == v + kept_second
    assert mem.evaluate(SEEDED + [GUARDED]).raw_recall == 1.0
    # The next batch starts from the last check's answers: one check (after it), not two.
    mem.inject([Fact("Ilse Brandvold", "lives in", "Tromsø")])
    assert len(calls) == 4 and [f.object for f in calls[3]][-2:] == ["Tromsø", "cello"]  # batch, then again
    # Whichever try is kept, the live weights are the committed state: a restart gives them.
    here = weights(mem)
    mem.close()
    again = make_memory(tmp_path / "copy")
    for l, w in weights(again).items():
        assert torch.equal(w, here[l]), f"layer {l} differs from the committed state"


def test_bad_inputs_change_nothing(seeded_memory):
    mem = seeded_memory
    before = weights(mem)
    with pytest.raises(InvalidFactError, match="empty"):
        mem.inject([KRAKOW, "Anselm |  | Paris"])
    with pytest.raises(InvalidFactError, match="500"):
        mem.inject([KRAKOW, Fact("x" * 501, "lives in", "Paris")])
    with pytest.raises(InvalidFactError, match="string"):
        mem.inject([{"subject": 3, "relation": "lives in", "object": "Paris"}])
    with pytest.raises(InvalidFactError):
        mem.inject([KRAKOW, 42])
    with pytest.raises(UnknownFactError):
        mem.forget(999)
    with pytest.raises(UnknownFactError):
        mem.forget("abc")
    with pytest.raises(InvalidFactError):
        mem.complete("")
    with pytest.raises(InvalidFactError):
        mem.ask("x" * 5000)
    assert [r.fact for r in mem.facts()] == SEEDED
    for l, w in weights(mem).items():
        assert torch.equal(w, before[l])


def test_home_bound_to_its_model(make_memory, tmp_path):
    from sleepwake.store import Store

    mem = make_memory(tmp_path / "h")
    mem.close()
    with pytest.raises(StoreError, match="belongs to model"):
        Store(tmp_path / "h", "gguf-other", "other-model")


def test_perplexity_is_measured_again_only_for_weights_not_measured_before(make_memory, cache_dir, monkeypatch):
    """Measured once per state of the weights, in any process: kept in memory while the
    weights are unchanged, and on disk under the cache for those exact weights."""
    import uuid

    import sleepwake.evaluate as evaluate_module
    import sleepwake.memory as memory_module

    calls = []
    real = evaluate_module.perplexity
    monkeypatch.setattr(evaluate_module, "perplexity", lambda *args: calls.append(1) or real(*args))
    # When it is measured is the test, not on what: a short text (the real one takes ~5 s
    # a call), which no earlier run measured.
    short = memory_module.perplexity_text()[:400] + f" {uuid.uuid4()}"
    monkeypatch.setattr(memory_module, "perplexity_text", lambda: short)
    mem = make_memory()
    first = mem.perplexity()
    assert mem.perplexity() == first and mem.evaluate(LISBON).ppl == first and len(calls) == 1
    name = mem.weights.names[0]
    w = mem.lm.arch.weight(name)
    g = torch.Generator().manual_seed(0)
    mem.weights.add(name, [(torch.randn(w.shape[0], 1, generator=g), torch.randn(1, w.shape[1], generator=g))])
    changed = mem.perplexity()
    assert changed != first and len(calls) == 2
    mem._rebuild()  # the committed weights again: read from disk
    assert mem.perplexity() == first and len(calls) == 2
    other = make_memory(mem.home.parent / "other")  # another home on the same (base) weights
    assert other.perplexity() == first and len(calls) == 2
    evaluate_module.perplexity_cache_path(other.lm, short, cache_dir).write_text("{not json")
    other._ppl = None  # a damaged file is measured again, not trusted
    assert other.perplexity() == first and len(calls) == 3


def test_bf16_steps_only_where_asked_or_faster(base_lm):
    """`bf16_targets`: False never, True wherever the CPU has bf16, None where it is measured faster."""
    from sleepwake.config import MemitConfig
    from sleepwake.memit.targets import bf16_matmuls_faster, bf16_phase_applies

    model, cpu = base_lm.model, torch.device("cpu")
    supported = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert not bf16_phase_applies(model, cpu, MemitConfig(bf16_targets=False))
    assert bf16_phase_applies(model, cpu, MemitConfig(bf16_targets=True)) == supported
    faster = bf16_matmuls_faster(model.get_input_embeddings().embedding_dim, torch.get_num_threads())
    assert bf16_phase_applies(model, cpu, MemitConfig()) == (supported and faster)
    assert not bf16_phase_applies(model, torch.device("cuda"), MemitConfig(bf16_targets=True))


def test_v_star_ends_in_float32_below_the_early_stop(base_lm):
    """v* may take its bulk of steps in bf16 (`bf16_targets`; forced on here, where the
    CPU supports it): the targets it returns must still meet the early-stop loss in float32. Checked
    independently: each request run alone in float32 with its slots' hidden states
    set to the returned values. The model's weights come out bitwise as they went in."""
    lm = base_lm
    from sleepwake.config import MemoryConfig
    from sleepwake.memit.requests import build_requests
    from sleepwake.memit.targets import compute_targets, make_slots
    from sleepwake.memit.trace import add_to_residual, run_capture

    # A strict early stop, so that bf16 rounding alone would leave requests above it;
    # a loose clamp, so that the step budget, not the clamp, decides whether δ gets there.
    cfg = MemoryConfig(progress=False).with_memit(early_stop_loss=0.01, clamp_norm_factor=1.5, bf16_targets=True).memit
    layer = max(lm.default_layers())
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    requests = build_requests([LISBON], lm.tokenizer, cfg)  # one δ, read by a raw and a chat prompt
    slots = make_slots(requests, cfg, lm.device)
    result = compute_targets(lm.model, lm.arch, lm.tokenizer, requests, slots, layer, cfg)
    assert result.loss_before > 1.0  # fictional facts: unknown before
    after = lm.model.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in state.items())
    for r, q in enumerate(requests):
        mine = (slots.rows == r).nonzero().squeeze(1)
        ids = torch.tensor([q.ids])
        _, hid = run_capture(lm.model, lm.arch, {"input_ids": ids}, hidden_layers=(layer,))
        cols = slots.cols[mine]
        delta = result.values[mine] - hid[layer][0, cols]
        with torch.no_grad(), add_to_residual(lm.arch, layer, torch.zeros_like(cols), cols, delta):
            logp = lm.model(input_ids=ids, use_cache=False).logits[0].float().log_softmax(-1)
        reads = torch.arange(q.prompt_len - 1, len(q.ids) - 1)
        nll = -logp[reads, ids[0, reads + 1]].mean().item()
        assert nll < cfg.early_stop_loss * 1.02, (q.kind, nll)  # 2%: another summation order


def test_v_star_steps_grow_with_the_facts_one_delta_carries(lm):
    """The step cap is `v_steps` times half the most facts a subject's δ must bring out
    (two targets each, raw and chat), rounded up; one or two facts per δ keep `v_steps`."""
    from sleepwake.config import MemitConfig
    from sleepwake.memit.requests import build_requests
    from sleepwake.memit.targets import make_slots, step_budget

    cfg = MemitConfig(v_steps=40)
    third = Fact("Anselm Kreutzer", "was born in", "Graz")

    def cap(facts: list[Fact], key_positions: str = "subject") -> int:
        c = MemitConfig(v_steps=40, key_positions=key_positions)
        return step_budget(make_slots(build_requests(facts, lm.tokenizer, c), c, lm.device), c)

    assert cap([LISBON, KRAKOW, TOKYO]) == cfg.v_steps  # three subjects, one fact each
    assert cap([LISBON, CARPENTER, KRAKOW]) == cfg.v_steps  # two facts share Anselm's δ
    assert cap([LISBON, CARPENTER, third]) == 2 * cfg.v_steps  # three do
    assert cap([LISBON, CARPENTER, third], "last") == cfg.v_steps  # keys per prompt: a δ per fact
    more = [Fact("Anselm Kreutzer", r, o) for r, o in (("speaks", "Basque"), ("has a dog named", "Pip"),
                                                       ("drives", "a tractor"))]
    assert cap([LISBON, CARPENTER, third, *more]) == 3 * cfg.v_steps  # six facts on one δ


def test_a_subject_that_gains_a_fact_starts_v_star_at_its_delta(make_memory):
    """A person holding `WARM_FROM` or more facts who gains one is solved from the δ that
    holds them (`Memory._held_deltas`): the first v* step already gives the old facts, so
    the loss starts far lower than from zero, and all four are answered after."""
    from sleepwake.config import MemoryConfig
    from sleepwake.memory import WARM_FROM

    mem = make_memory(config=MemoryConfig(progress=False))
    three = [LISBON, CARPENTER, Fact("Anselm Kreutzer", "was born in", "Graz")]
    assert len(three) == WARM_FROM
    first = mem.inject(three).stats[0]  # one batch, one δ for the three, from zero
    fourth = Fact("Anselm Kreutzer", "speaks", "Basque")
    start = mem._held_deltas([fourth, TOKYO])
    assert set(start) == {"anselm kreutzer"}  # Mateus holds nothing: solved from zero
    layer = mem.layers[-1]
    assert torch.equal(start["anselm kreutzer"], mem._edits[mem.facts()[0].id].v[layer])
    again = mem.inject(fourth).stats[0]
    assert again.v_loss_before < first.v_loss_before / 2, (first, again)
    report = mem.evaluate([*three, fourth])
    assert report.raw_recall == 1.0 and report.chat_recall == 1.0, report
