"""Speed on this machine: cached model load, cold covariance, injecting 5 facts.

    python benchmarks/speed.py [--batches 4] [--fp32-targets | --bf16-targets] [--raw-only]

With more than 8 batches, batch 9 takes MEMIT past `chat_edit_max_facts` (40): it first
edits the 40 facts held again, raw-only (`raw_only_again` names the batch).

By default v* takes its bulk of steps in bf16 only where bf16 matmuls are faster on this
CPU (`bf16_targets=None`); --fp32-targets runs every step in float32 and --bf16-targets
forces the bf16 steps, for comparison. --raw-only edits raw completions only (the CLI's
`--raw-only`, `chat_edit=False`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import save

from sleepwake.config import MemoryConfig
from sleepwake.memit.targets import bf16_phase_applies
from sleepwake.memory import Memory
from sleepwake.models import load_model
from sleepwake.synthetic import fictional_facts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, default=4)
    targets = ap.add_mutually_exclusive_group()
    targets.add_argument("--fp32-targets", action="store_true", help="v* all in float32 (bf16_targets=False)")
    targets.add_argument("--bf16-targets", action="store_true", help="v* bulk in bf16 (bf16_targets=True)")
    ap.add_argument("--raw-only", action="store_true", help="no chat edits (chat_edit=False)")
    args = ap.parse_args()
    load_model(progress=False)  # make sure the converted weights are cached
    t = time.perf_counter()
    lm = load_model(progress=False)
    load_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as home:
        choice = False if args.fp32_targets else True if args.bf16_targets else None
        config = MemoryConfig(progress=False).with_memit(bf16_targets=choice, chat_edit=not args.raw_only)
        mem = Memory(lm, home=home, cache_dir=cache, config=config)
        t = time.perf_counter()
        mem.editor()  # cold: computes Ĉ for every edited layer
        cov_s = time.perf_counter() - t
        facts = fictional_facts(args.batches * 5, 1, seed=11)
        times, steps, again = [], [], []
        for i in range(args.batches):
            t = time.perf_counter()
            res = mem.inject(facts[5 * i : 5 * i + 5])
            times.append(time.perf_counter() - t)
            steps.append(res.stats[0].v_steps)
            again.append(res.stats[0].raw_only_again)
            print(f"batch {i}: {times[-1]:.2f} s, v* steps {steps[-1]}, edited again raw-only {again[-1]}",
                  flush=True)
        recall = mem.evaluate(facts).raw_recall
    name = "speed-fp32-targets" if args.fp32_targets else "speed-bf16-targets" if args.bf16_targets else "speed"
    name += "-raw-only" if args.raw_only else ""
    save(name, {
        "bf16_targets": choice,
        "chat_edit": config.memit.chat_edit,
        "bf16_steps": bf16_phase_applies(lm.model, torch.device("cpu"), config.memit),
        "model_load_cached_s": round(load_s, 2),
        "covariance_cold_s": round(cov_s, 1),
        "inject5_s": [round(x, 2) for x in times],
        "inject5_median_s": round(statistics.median(times), 2),
        "v_steps": steps,
        "raw_only_again": again,
        "raw_recall": recall,
        "layers": list(mem.layers),
    })


if __name__ == "__main__":
    main()
