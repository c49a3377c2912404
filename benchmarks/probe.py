"""Probe MEMIT settings: inject fictional facts with a config change, then measure.

Facts come from the 20-subjects-style generator (several relations per subject,
grouped by subject), injected in batches; prints the time and perplexity of every
third batch, then raw and chat recall of all facts and the misses. Used for the
layer, λ and v* choices recorded in BENCHMARKS.md.

    python benchmarks/probe.py N_FACTS '{"lambda_reg": 10, "layers": [4, 5, 6, 7]}' [--batch 6] [--relations 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from common import save

from sleepwake.config import MemoryConfig
from sleepwake.corpus import locality_facts
from sleepwake.evaluate import raw_completions, recall
from sleepwake.memory import Memory
from sleepwake.synthetic import fictional_facts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("n", type=int)
    ap.add_argument("changes", nargs="?", default="{}", help="MemitConfig fields as JSON")
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--relations", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--name", default="probe")
    args = ap.parse_args()
    changes = json.loads(args.changes)
    if "layers" in changes:
        changes["layers"] = tuple(changes["layers"])
    cfg = MemoryConfig(progress=False, batch_size=args.batch).with_memit(**changes)
    facts = fictional_facts(200, args.relations, seed=args.seed)[: args.n]
    with tempfile.TemporaryDirectory() as home:
        mem = Memory(home=home, config=cfg)
        mem.editor()
        ppl0 = mem.perplexity()
        loc = locality_facts()
        known = [f for f, a in zip(loc, raw_completions(mem.model, mem.tokenizer, loc)) if recall([a], [f])]
        seconds = 0.0
        for i in range(0, len(facts), args.batch):
            t = time.perf_counter()
            res = mem.inject(facts[i : i + args.batch])
            seconds += time.perf_counter() - t
            st = res.stats[0]
            if (i // args.batch) % 3 == 0:
                print(f"batch {i // args.batch}: {time.perf_counter() - t:.1f} s, v* steps {st.v_steps}, "
                      f"loss {st.v_loss_before:.2f} -> {st.v_loss_after:.3f}, ppl {mem.perplexity():.3f}", flush=True)
        rep = mem.evaluate(facts)
        locality = recall(raw_completions(mem.model, mem.tokenizer, known), known)
        layers = list(mem.layers)
    misses = [f"{f.subject} | {f.relation} | {f.object} -> raw {f.raw_completion[:40]!r}, chat {f.chat_answer[:40]!r}"
              for f in rep.facts if not (f.raw_ok and f.chat_ok)]
    print("\n".join(misses))
    save(args.name, {"changes": args.changes, "layers": layers, "facts": len(facts), "batch": args.batch,
                     "raw_recall": rep.raw_recall, "chat_recall": rep.chat_recall, "ppl_base": round(ppl0, 3),
                     "ppl": round(rep.ppl, 3), "ppl_change": round(rep.ppl / ppl0 - 1, 4),
                     "locality": round(locality, 4), "locality_facts": len(known),
                     "inject_seconds_per_batch": round(seconds / -(-len(facts) // args.batch), 1),
                     "misses": len(misses)})


if __name__ == "__main__":
    main()
