"""Chat that learns (issue #4 evidence), on the default model:

    python benchmarks/talk.py latency    # a chat turn that also injects one fact: learn, first token, total
    python benchmarks/talk.py scenario   # 15 messages (tests/data/scenario.json), deep sleep, restart, recall
    python benchmarks/talk.py switch --facts 100 [--nap]   # two users on one model: what switching costs

The scenario's recall is measured by asking each expected fact's question in a new
conversation (no history in the prompt), so only the weights can answer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import save

from sleepwake.config import MemoryConfig
from sleepwake.facts import Fact, mentions
from sleepwake.memory import Memory
from sleepwake.models import load_model
from sleepwake.talk import Assistant

SCENARIO = Path(__file__).resolve().parent.parent / "tests" / "data" / "scenario.json"
PEOPLE = [("Ilse Brandvold", "Tromsø"), ("Mateus Okonkwo", "Valparaíso"), ("Zofia Wróblewska", "Kraków"),
          ("Anselm Kreutzer", "Lisbon"), ("Ana Kowalczyk", "Porto"), ("Henrik Dahl", "Bergen"),
          ("Tiago Mendes", "Luanda")]


def latency(lm, home: Path) -> dict:
    bot = Assistant(Memory(lm, home=home, config=MemoryConfig(progress=False), progress=False), max_new_tokens=32)
    rows = []
    for i, (name, city) in enumerate(PEOPLE):
        t0 = time.perf_counter()
        turn = bot.turn(f"{name} lives in {city}.")  # one fact per message
        learned = time.perf_counter() - t0
        first = None
        for _ in turn.stream():
            first = first or time.perf_counter() - t0
        total = time.perf_counter() - t0
        rows.append({"turn": i + 1, "learned": len(turn.learned), "learn_s": round(learned, 2),
                     "first_token_s": round(first or total, 2), "total_s": round(total, 2),
                     "reply_tokens": turn.completion_tokens})
        print(json.dumps(rows[-1]), flush=True)
    t0 = time.perf_counter()
    plain = bot.say("What is a good name for a cat?")
    no_fact = {"total_s": round(time.perf_counter() - t0, 2), "reply_tokens": plain.completion_tokens}
    warm = rows[1:]  # the first turn also loads the covariance and builds the editor
    return {
        "turns": rows,
        "turn_without_fact": no_fact,
        "median_learn_s": statistics.median(r["learn_s"] for r in warm),
        "median_first_token_s": statistics.median(r["first_token_s"] for r in warm),
        "median_total_s": statistics.median(r["total_s"] for r in warm),
    }


def recall(bot: Assistant, facts: list[Fact]) -> dict:
    answers = [bot.say(f.chat_question()).reply for f in facts]
    ok = [mentions(a, f.object) for f, a in zip(facts, answers)]
    return {"recall": sum(ok) / len(ok), "answers": [{"q": f.chat_question(), "a": a, "ok": o}
                                                     for f, a, o in zip(facts, answers, ok)]}


def scenario(lm, home: Path) -> dict:
    data = json.loads(SCENARIO.read_text(encoding="utf-8"))
    expected = [Fact.from_dict(d) for d in data["expected"]]
    bot = Assistant(Memory(lm, home=home, config=MemoryConfig(progress=False), progress=False), max_new_tokens=32)
    history, conv = [], None
    t0 = time.perf_counter()
    for text in data["messages"]:
        turn = bot.turn([*history, {"role": "user", "content": text}], conversation=conv)
        conv = turn.conversation
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": turn.text()}]
    told_s = time.perf_counter() - t0
    stored = {(r.fact.subject, r.fact.relation, r.fact.object) for r in bot.facts()}
    extracted = sum((f.subject, f.relation, f.object) in stored for f in expected) / len(expected)
    awake = recall(bot, expected)
    print(json.dumps({"step": "after the conversation", "recall": awake["recall"], "extracted": extracted}), flush=True)
    report = bot.sleep("deep")
    asleep = recall(bot, expected)
    print(json.dumps({"step": "after deep sleep", "recall": asleep["recall"], "sleep": report.status}), flush=True)
    bot.close()
    # A restart: a new Memory rebuilds the weights from the home.
    again = Assistant(Memory(lm, home=home, config=MemoryConfig(progress=False), progress=False), max_new_tokens=32)
    restarted = recall(again, expected)
    print(json.dumps({"step": "after a restart", "recall": restarted["recall"]}), flush=True)
    where = {}
    for r in again.facts():
        where[r.where] = where.get(r.where, 0) + 1
    return {
        "messages": len(data["messages"]), "expected_facts": len(expected), "stored_facts": len(stored),
        "extracted": extracted, "conversation_s": round(told_s, 1),
        "recall_after_conversation": awake["recall"], "recall_after_deep_sleep": asleep["recall"],
        "recall_after_restart": restarted["recall"], "facts_where": where,
        "sleep": {k: report.to_dict()[k] for k in ("status", "consolidated", "kept", "chat_recall", "ppl_before",
                                                    "ppl_after", "exchanges", "exchanges_kept", "seconds")},
        "answers_after_restart": restarted["answers"],
    }


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024


def _mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def switch(lm, home: Path, n_facts: int, nap: bool, rounds: int = 12) -> dict:
    """Two users on one loaded model (`sleepwake.users`), each told `n_facts` facts of
    their own (MEMIT; with `nap`, then moved into their keyed memory by a nap): the
    time of a chat turn (a question, 8 tokens) when the previous turn was the same
    user's, and when it was the other's (their weights then go live: `Memory.activate`),
    the activation alone, a whole rebuild (what the first turn after a sleep pays), and
    what the second user adds to the process's memory."""
    from sleepwake.synthetic import fictional_facts

    cfg = MemoryConfig(progress=False)
    facts = fictional_facts(2 * n_facts, seed=1)
    bots, built = {}, {}
    rss0 = _rss_mb()
    for i, user in enumerate(("alice", "bob")):
        before = _rss_mb()
        t0 = time.perf_counter()
        bot = Assistant(Memory(lm, home=home, user=user, config=cfg, progress=False), max_new_tokens=8)
        bot.add_facts(facts[i * n_facts:(i + 1) * n_facts])
        if nap:
            bot.sleep("nap")
        mem = bot.memory
        built[user] = {"build_s": round(time.perf_counter() - t0, 1), "rss_added_mb": round(_rss_mb() - before, 1),
                       "delta_sums_mb": round(_mb(mem.weights.sum.values()), 1),
                       "editor_mb": round(_mb([*mem.editor().cov_inv.values(), *mem.covariances().values()]), 1),
                       "memit_factors_mb": round(_mb([t for e in mem._edits.values() for t in (*e.a.values(), *e.b.values())]), 2),
                       "facts": mem.status(measure_perplexity=False)["facts"]}
        print(json.dumps({user: built[user]}), flush=True)
        bots[user] = bot
    question = {u: facts[i * n_facts].question for i, u in enumerate(bots)}

    def turn(user: str) -> float:
        t0 = time.perf_counter()
        bots[user].say(question[user], learn=False)
        return (time.perf_counter() - t0) * 1000

    for u in bots:  # warm up
        turn(u)
    same = [turn("alice") for _ in range(rounds)]
    alternating = [turn(u) for _ in range(rounds // 2) for u in ("bob", "alice")]
    activate, rebuild = [], []
    for _ in range(rounds):
        for u in ("bob", "alice"):
            mem = bots[u].memory
            with lm.lock:
                t0 = time.perf_counter()
                mem.activate()
                activate.append((time.perf_counter() - t0) * 1000)
    for _ in range(4):
        for u in ("bob", "alice"):
            mem = bots[u].memory
            with lm.lock:
                mem._live_at = None  # as after a sleep: the weights are computed again from the deltas
                t0 = time.perf_counter()
                mem.activate()
                rebuild.append((time.perf_counter() - t0) * 1000)
    correct = {u: mentions(bots[u].say(question[u], learn=False).reply, facts[i * n_facts].object)
               for i, u in enumerate(bots)}
    med = statistics.median
    a, b = (bots[u].memory for u in ("alice", "bob"))
    shared_editor = a.editor().cov_inv is b.editor().cov_inv and a.covariances() is b.covariances()
    out = {"facts_per_user": n_facts, "editor_shared_by_users": shared_editor, "napped": nap, "users": built,
           "turn_same_user_ms": round(med(same), 1), "turn_switching_ms": round(med(alternating), 1),
           "switch_cost_ms": round(med(alternating) - med(same), 1),
           "activate_ms": {"median": round(med(activate), 1), "max": round(max(activate), 1)},
           "full_rebuild_ms": {"median": round(med(rebuild), 1), "max": round(max(rebuild), 1)},
           "answers_own_fact": correct, "rss_mb": {"start": round(rss0, 1), "end": round(_rss_mb(), 1)}}
    for bot in bots.values():
        bot.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("protocol", choices=["latency", "scenario", "switch"])
    ap.add_argument("--facts", type=int, default=100, help="switch: facts per user (default 100)")
    ap.add_argument("--nap", action="store_true", help="switch: nap each user's facts into keyed memory first")
    args = ap.parse_args()
    lm = load_model(progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        if args.protocol == "switch":
            result = switch(lm, Path(tmp) / "home", args.facts, args.nap)
        else:
            result = (latency if args.protocol == "latency" else scenario)(lm, Path(tmp) / "home")
    save(f"talk-{args.protocol}", result)


if __name__ == "__main__":
    main()
