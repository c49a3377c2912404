"""Capacity curve (paper Table 2): cumulative recall as facts accumulate, batches of 5.

At each checkpoint: raw and chat recall of all facts injected so far, perplexity on
the fixed text, and locality (share of real-world facts the unedited model
completed correctly that it still completes correctly). Writes
results/capacity.json and results/capacity.png.

    python benchmarks/capacity.py [--max 200] [--layers 4-11] [--lambda 0.1]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from common import RESULTS, save

from sleepwake.config import MemoryConfig
from sleepwake.corpus import locality_facts
from sleepwake.evaluate import chat_answers, raw_completions, recall
from sleepwake.memory import Memory
from sleepwake.synthetic import fictional_facts

CHECKPOINTS = (5, 10, 20, 40, 60, 100, 200)


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    a, _, b = text.partition("-")
    return tuple(range(int(a), int(b) + 1)) if b else tuple(int(x) for x in text.split(","))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--max", type=int, default=200)
    ap.add_argument("--layers")
    ap.add_argument("--lambda", dest="lam", type=float)
    ap.add_argument("--name", default="capacity")
    args = ap.parse_args()
    changes = {}
    if args.layers:
        changes["layers"] = parse_layers(args.layers)
    if args.lam:
        changes["lambda_reg"] = args.lam
    cfg = MemoryConfig(progress=False).with_memit(**changes)
    facts = fictional_facts(args.max // 2, 2, seed=7)[: args.max]
    loc = locality_facts()
    with tempfile.TemporaryDirectory() as home:
        mem = Memory(home=home, config=cfg, progress=False)
        mem.editor()
        ppl0 = mem.perplexity()
        # Locality: real-world facts the unedited model gets right, as a raw completion
        # and as a chat answer; afterwards, the share of them still right.
        raw_known = [f for f, a in zip(loc, raw_completions(mem.model, mem.tokenizer, loc)) if recall([a], [f])]
        chat_known = [f for f, a in zip(loc, chat_answers(mem.model, mem.tokenizer, loc)) if recall([a], [f])]
        rows = []
        t_inject = 0.0
        for start in range(0, len(facts), 5):
            t = time.perf_counter()
            mem.inject(facts[start : start + 5])
            t_inject += time.perf_counter() - t
            n = start + 5
            if n in CHECKPOINTS or n == len(facts):
                rep = mem.evaluate(facts[:n])
                locality = recall(raw_completions(mem.model, mem.tokenizer, raw_known), raw_known)
                chat_locality = recall(chat_answers(mem.model, mem.tokenizer, chat_known), chat_known)
                row = {"facts": n, "raw_recall": rep.raw_recall, "chat_recall": rep.chat_recall,
                       "ppl": round(rep.ppl, 4), "ppl_change": round(rep.ppl / ppl0 - 1, 4),
                       "locality": round(locality, 4), "chat_locality": round(chat_locality, 4),
                       "inject_seconds_total": round(t_inject, 1)}
                print(row, flush=True)
                rows.append(row)
        layers = list(mem.layers)
    save(args.name, {"layers": layers, "lambda": cfg.memit.lambda_reg, "ppl_base": round(ppl0, 4),
                     "locality_facts": len(loc), "raw_locality_facts": len(raw_known),
                     "chat_locality_facts": len(chat_known), "rows": rows})
    plot(rows, RESULTS / f"{args.name}.png")


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["facts"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(n, [r["raw_recall"] for r in rows], "o-", label="raw recall")
    ax.plot(n, [r["chat_recall"] for r in rows], "s-", label="chat recall")
    ax.plot(n, [r["locality"] for r in rows], "^-", label="locality, raw (real-world facts kept)")
    ax.plot(n, [r["chat_locality"] for r in rows], "v-", label="locality, chat")
    ax.plot([40, 60], [0.82, 0.83], "kx", label="paper, 8B raw recall")
    ax.set_xscale("log")
    ax.set_xticks(n, [str(x) for x in n])
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("facts injected (batches of 5)")
    ax.set_ylabel("share")
    ax2 = ax.twinx()
    ax2.plot(n, [100 * r["ppl_change"] for r in rows], "r--", label="perplexity change (%)")
    ax2.set_ylabel("perplexity change (%)", color="r")
    fig.legend(loc="lower left", bbox_to_anchor=(0.1, 0.18), fontsize=8)
    ax.set_title("MEMIT capacity on SmolLM2-135M-Instruct")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
