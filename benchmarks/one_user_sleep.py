"""One user of `data/first_person.json` tells their messages to an `Assistant`; then a
deep sleep and a restart (a new `Memory` on the same home). Per fact, whether it is
answered (raw prompt and chat question, `evaluate.held`) before the sleep, after it and
after the restart, and what the sleep consolidated or kept in MEMIT (issue 25: one δ
per subject must carry all of a user's facts).

    python benchmarks/one_user_sleep.py [--user 4]

Writes results/one-user-sleep-<user>.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import save

from sleepwake.config import MemoryConfig
from sleepwake.evaluate import held
from sleepwake.memory import Memory
from sleepwake.models import load_model
from sleepwake.talk import Assistant

CORPUS = Path(__file__).resolve().parent / "data" / "first_person.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--user", type=int, default=4, help="index of the user in the corpus (default 4)")
    args = ap.parse_args()
    users = json.loads(CORPUS.read_text(encoding="utf-8"))["users"]
    if not 0 <= args.user < len(users):
        ap.error(f"--user must be 0 to {len(users) - 1}")
    lm = load_model(progress=False)
    cfg = MemoryConfig(progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        mem = Memory(lm, home=tmp, config=cfg, progress=False)
        bot = Assistant(mem, auto_sleep=False)
        for message in users[args.user]["messages"]:
            bot.say(message)
        facts = [r.fact for r in mem.facts()]
        before = held(mem.model, mem.tokenizer, facts, chat=True)
        report = mem.sleep()
        after = held(mem.model, mem.tokenizer, facts, chat=True)
        mem.close()
        with Memory(lm, home=tmp, config=cfg, progress=False) as again:
            restart = held(again.model, again.tokenizer, facts, chat=True)
    print(f"answered: before {sum(before)}/{len(facts)}, after the deep sleep {sum(after)}, after a restart "
          f"{sum(restart)}; consolidated {len(report.consolidated)}, kept {len(report.kept)}, reused {report.reused}")
    save(f"one-user-sleep-{args.user}", {
        "user": args.user, "facts": [f.to_dict() for f in facts], "before": before, "after_sleep": after,
        "after_restart": restart, "sleep": {"status": report.status, "consolidated": len(report.consolidated),
                                            "kept": len(report.kept), "reused": report.reused},
        "keyed_clamp_norm_factor": cfg.keyed_clamp_norm_factor})


if __name__ == "__main__":
    main()
