"""Which layers to edit on the default model: a sweep over layer bands.

For each band: inject 20 fictional facts in batches of 5, then measure raw and chat
recall, perplexity change, locality and time. Writes results/layer_sweep.json.

    python benchmarks/layer_sweep.py [--bands 2-9,4-11,...] [--facts 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from capacity import parse_layers
from common import save

from sleepwake.config import MemoryConfig
from sleepwake.corpus import locality_facts
from sleepwake.evaluate import raw_completions, recall
from sleepwake.memory import Memory
from sleepwake.models import load_model
from sleepwake.synthetic import fictional_facts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bands", default="1-4,2-9,4-11,6-13,8-15,12-19")
    ap.add_argument("--facts", type=int, default=20)
    args = ap.parse_args()
    lm = load_model(progress=False)
    facts = fictional_facts(args.facts, 1, seed=5)
    loc = locality_facts()
    rows = []
    for band in args.bands.split(","):
        layers = parse_layers(band)
        cfg = MemoryConfig(progress=False).with_memit(layers=layers)
        with tempfile.TemporaryDirectory() as home:
            mem = Memory(lm, home=home, config=cfg)
            mem.editor()
            ppl0 = mem.perplexity()
            t = time.perf_counter()
            for i in range(0, len(facts), 5):
                mem.inject(facts[i : i + 5])
            seconds = time.perf_counter() - t
            rep = mem.evaluate(facts)
            row = {"layers": band, "raw_recall": rep.raw_recall, "chat_recall": rep.chat_recall,
                   "ppl_change": round(rep.ppl / ppl0 - 1, 4),
                   "locality": round(recall(raw_completions(mem.model, mem.tokenizer, loc), loc), 4),
                   "inject_s_per_5": round(seconds / (len(facts) / 5), 1)}
            print(row, flush=True)
            rows.append(row)
            mem.close()
    save("layer_sweep", {"facts": args.facts, "rows": rows})


if __name__ == "__main__":
    main()
