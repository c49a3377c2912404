"""First-person questions and questions nothing stored answers (issue 26), on the default model:

    python benchmarks/first_person.py                # all five users of benchmarks/data/first_person.json
    python benchmarks/first_person.py --users 2      # the first two (a shorter run)

Each user has a home of their own and tells their messages to an `Assistant`. Then, in
new conversations (no history in the prompt, so only the weights can answer):

- recall: the reply to each first-person question names all its expected objects;
  against it, the same question asked as it is (`Memory.ask`, the path before issue 26)
  and the canonical questions of the stored facts (what the weights hold: a ceiling),
  and recall over the questions whose facts the weights hold (the rewriting alone);
- leak: a question about a known person that nothing stored answers gets a reply that
  names one of that person's stored objects (`unknown="mask"` and `"decline"`, and as it is);
- about: the share of a person's stored objects that "Who is X?" / "What do you know
  about me?" name;
- fluency: the mean per-token NLL, under the base model, of the replies to the unknown
  questions, against the base model's own greedy answers to them (goal: within +20%).

Users tell their messages with auto sleep on, as `sleepwake chat` and `serve` do; a nap
that the telling set off (a fact MEMIT did not hold) ends before the questions.

Then a deep sleep, a restart (a new `Memory` on the same home), and recall, leak and
about again. Results go to results/first-person.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import save

from sleepwake.config import MemoryConfig
from sleepwake.extract import split_items
from sleepwake.facts import Fact, mentions
from sleepwake.inference import chat_text, encode, encode_target
from sleepwake.memory import Memory
from sleepwake.models import load_model
from sleepwake.questions import USER
from sleepwake.talk import Assistant

CORPUS = Path(__file__).resolve().parent / "data" / "first_person.json"
MAX_NEW_TOKENS = 32
ABOUT_TOKENS = 96  # a sentence per fact: the Assistant's default reply length
MODES = ("mask", "decline")


def log(**row: object) -> None:
    print(json.dumps(row, ensure_ascii=False), flush=True)


def objects_of(facts: list[Fact], who: str, me: tuple[str, ...]) -> list[str]:
    """The stored objects of a person ("me": the user's), one item each, names left out
    (a reply about Ottilie that says "Ottilie Branstrom" leaks nothing)."""
    subjects = me if who == "me" else (who,)
    return [item for f in facts if f.subject in subjects and f.relation != "is named" for item in split_items(f.object)]


def start(lm, home: Path) -> Assistant:
    """An assistant as `sleepwake chat` and `serve` make it: auto sleep on, in the background."""
    return Assistant(Memory(lm, home=home, config=MemoryConfig(progress=False), progress=False),
                     auto_sleep=True, max_new_tokens=MAX_NEW_TOKENS)


def measure(bot: Assistant, user: dict, facts: list[Fact], me: tuple[str, ...], *, before: bool) -> dict:
    """Recall, leaks and summaries through `bot`; with `before`, also the questions asked
    as they are (the path before issue 26) and the canonical questions."""
    out: dict = {"questions": [], "unknown": [], "about": []}
    for q, expected in user["questions"]:
        reply = bot.say(q).reply
        row = {"q": q, "expected": expected, "reply": reply, "ok": all(mentions(reply, e) for e in expected)}
        if before:
            plain = bot.memory.ask(q, max_new_tokens=MAX_NEW_TOKENS)
            row |= {"as_is": plain, "as_is_ok": all(mentions(plain, e) for e in expected)}
        out["questions"].append(row)
    canonical = [bot.memory.ask(f.chat_question(), max_new_tokens=MAX_NEW_TOKENS) for f in facts]
    out["canonical"] = [{"q": f.chat_question(), "reply": a, "ok": mentions(a, f.object)} for f, a in zip(facts, canonical)]
    mark_held(out["questions"], facts, out["canonical"])
    for q, who in user["unknown"]:
        objects = objects_of(facts, who, me)
        row = {"q": q, "who": who}
        for mode in MODES:
            bot.unknown = mode
            row[mode] = bot.say(q).reply
            row[f"{mode}_leak"] = any(mentions(row[mode], o) for o in objects)
        bot.unknown = "mask"
        if before:
            row["as_is"] = bot.memory.ask(q, max_new_tokens=MAX_NEW_TOKENS)
            row["as_is_leak"] = any(mentions(row["as_is"], o) for o in objects)
        out["unknown"].append(row)
    for q, who in user["about"]:
        objects = objects_of(facts, who, me) + [f.object for f in facts if who == "me" and f.relation == "is named"]
        reply = bot.say(q, max_new_tokens=ABOUT_TOKENS).reply
        named = [o for o in objects if mentions(reply, o)]
        out["about"].append({"q": q, "reply": reply, "share": len(named) / len(objects), "missing":
                             [o for o in objects if o not in named]})
    return out


def mark_held(questions: list[dict], facts: list[Fact], canonical: list[dict]) -> None:
    """Whether the weights hold what each question asks: every expected object is in a
    fact whose canonical question they answer. Recall where held measures the rewriting
    alone; the rest of the gap to 1 is the memory's."""
    held = [f.object for f, c in zip(facts, canonical) if c["ok"]]
    for row in questions:
        row["held"] = all(any(mentions(o, e) for o in held) for e in row["expected"])


@torch.no_grad()
def nll(model, tok, question: str, answer: str) -> float:
    """Mean per-token negative log-likelihood of `answer` after the chat question."""
    prompt = chat_text(tok, question)
    p = encode(tok, prompt, chat=True)
    target = encode_target(tok, prompt, answer, chat=True)
    if not target:
        return float("nan")
    ids = torch.tensor([p + target])
    logits = model(input_ids=ids).logits[0, len(p) - 1 : -1].float()
    return F.cross_entropy(logits, torch.tensor(target)).item()


def fluency(lm, home: Path, rows: list[dict]) -> dict:
    """NLL under the base model of each mode's replies and of the base model's own answers."""
    with Memory(lm, home=home, config=MemoryConfig(progress=False), progress=False) as base:  # empty: base weights
        out: dict[str, list[float]] = {"base": [], **{m: [] for m in MODES}}
        for row in rows:
            own = base.ask(row["q"], max_new_tokens=MAX_NEW_TOKENS)
            row["base"] = own
            out["base"].append(nll(base.model, base.tokenizer, row["q"], own))
            for mode in MODES:
                out[mode].append(nll(base.model, base.tokenizer, row["q"], row[mode]))
    means = {k: statistics.fmean(x for x in v if x == x) for k, v in out.items()}  # an empty reply has no NLL
    return {"mean_nll": means, "ratio_to_base": {m: means[m] / means["base"] for m in MODES}}


def rate(rows: list[dict], key: str) -> float:
    return sum(bool(r[key]) for r in rows) / len(rows) if rows else float("nan")


def summary(phase: list[dict]) -> dict:
    qs = [r for p in phase for r in p["questions"]]
    un = [r for p in phase for r in p["unknown"]]
    ab = [r for p in phase for r in p["about"]]
    can = [r for p in phase for r in p["canonical"]]
    held = [r for r in qs if r["held"]]
    out = {"questions": len(qs), "recall": rate(qs, "ok"), "canonical_recall": rate(can, "ok"),
           "held": len(held), "recall_where_held": rate(held, "ok"),
           "unknown": len(un), **{f"leak_{m}": rate(un, f"{m}_leak") for m in MODES},
           "about_share": statistics.fmean(r["share"] for r in ab) if ab else float("nan")}
    if qs and "as_is_ok" in qs[0]:
        out |= {"recall_as_is": rate(qs, "as_is_ok"), "leak_as_is": rate(un, "as_is_leak")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=None, help="only the first N users of the corpus")
    args = ap.parse_args()
    users = json.loads(CORPUS.read_text(encoding="utf-8"))["users"][: args.users]
    lm = load_model(progress=False)
    told, restarted, sleeps, extraction = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, user in enumerate(users):
            home = Path(tmp) / f"user{i}"
            facts = [Fact(*f) for f in user["facts"]]
            me = (user["name"], USER) if user["name"] else (USER,)
            bot = start(lm, home)
            t0 = time.perf_counter()
            for message in user["messages"]:
                bot.say(message, max_new_tokens=4)  # the reply does not matter here
            bot.wait()  # a nap the telling set off (a fact MEMIT did not hold) ends first
            naps = [c for c in bot.history() if c["kind"] == "nap"]
            stored = {(r.fact.subject, r.fact.relation, r.fact.object) for r in bot.facts()}
            extraction.append(sum((f.subject, f.relation, f.object) in stored for f in facts) / len(facts))
            told.append(measure(bot, user, facts, me, before=True))
            told[-1]["naps"] = [{k: c.get(k) for k in ("status", "id")} for c in naps]
            log(user=i, step="told", told_s=round(time.perf_counter() - t0, 1), extracted=extraction[-1],
                naps=len(naps), **summary([told[-1]]))
            report = bot.sleep("deep")
            sleeps.append({k: report.to_dict()[k] for k in ("status", "consolidated", "kept", "seconds")})
            bot.close()
            bot = start(lm, home)  # a restart: the weights rebuilt from the home
            restarted.append(measure(bot, user, facts, me, before=False))
            log(user=i, step="deep sleep + restart", sleep=sleeps[-1]["status"], **summary([restarted[-1]]))
            bot.close()
        rows = [r for p in told + restarted for r in p["unknown"]]
        flu = fluency(lm, Path(tmp) / "base", rows)
    log(step="fluency", **flu)
    save("first-person", {
        "corpus": str(CORPUS.name), "users": len(users),
        "facts": sum(len(u["facts"]) for u in users), "extracted": statistics.fmean(extraction),
        "told": summary(told), "after_deep_sleep_and_restart": summary(restarted), "fluency": flu,
        "sleeps": sleeps, "per_user": [{"told": t, "restarted": r} for t, r in zip(told, restarted)],
    })


if __name__ == "__main__":
    main()
