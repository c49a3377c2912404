"""Chat that learns (issue #4 evidence), on the default model:

    python benchmarks/talk.py latency    # a chat turn that also injects one fact: learn, first token, total
    python benchmarks/talk.py scenario   # 15 messages (tests/data/scenario.json), deep sleep, restart, recall

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("protocol", choices=["latency", "scenario"])
    args = ap.parse_args()
    lm = load_model(progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        result = (latency if args.protocol == "latency" else scenario)(lm, Path(tmp) / "home")
    save(f"talk-{args.protocol}", result)


if __name__ == "__main__":
    main()
