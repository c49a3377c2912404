"""How firmly a base model knows the real-world facts the locality figure reads, in float32 and
in NF4 (issue 27: on Gemma-3-270M, MEMIT beside 4-bit weights lost 0.05-0.07 more locality).

For each locality fact the base model completes right, the margin is log p(object's first
token) minus the best other token's log p, teacher-forced after the raw prompt. A fact known by
a small margin flips under a small disturbance, so if 4-bit weights know their facts by smaller
margins, a locality gap under the same edits says that, not a fault of the edit beside them.

    python benchmarks/margins.py [--model gemma-3-270m-q4_k_m.gguf]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
from common import known_facts, save

from sleepwake.corpus import locality_facts
from sleepwake.inference import encode, encode_target, raw_prompt
from sleepwake.models import load_model


@torch.no_grad()
def margins(lm: Any, facts: list) -> list[float]:
    """Per fact: log p(first object token) − max log p(any other token) after its prompt."""
    out = []
    for f in facts:
        prompt = raw_prompt(lm.tokenizer, f)
        ids = encode(lm.tokenizer, prompt)
        first = encode_target(lm.tokenizer, prompt, " " + f.object)[0]
        logp = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0, -1].float(), -1)
        right = logp[first].item()
        logp[first] = -float("inf")
        out.append(right - logp.max().item())
    return out


def summary(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "median": round(statistics.median(xs), 3), "mean": round(statistics.fmean(xs), 3),
            "under_1": round(sum(x < 1 for x in xs) / len(xs), 3), "under_0": round(sum(x < 0 for x in xs) / len(xs), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model path or id (default: the default model)")
    args = ap.parse_args()
    loc = locality_facts()
    result: dict[str, Any] = {"model": args.model or "default", "locality_facts": len(loc)}
    per_fact: dict[str, dict[Any, float]] = {}
    for scheme in ("float32", "nf4"):
        lm = load_model(args.model, progress=False, quantize=None if scheme == "float32" else scheme)
        known = known_facts(lm, loc)
        per_fact[scheme] = dict(zip(known, margins(lm, known)))
        result[scheme] = {"known": len(known), "margin": summary(list(per_fact[scheme].values()))}
        print(scheme, result[scheme], flush=True)
        del lm
    both = [f for f in per_fact["float32"] if f in per_fact["nf4"]]  # the same facts on each side
    result["known_by_both"] = {s: summary([per_fact[s][i] for i in both]) for s in per_fact}
    print("known by both", result["known_by_both"], flush=True)
    name = "margins-" + ("gemma" if args.model and "gemma" in args.model else "smollm2")
    save(name, result)


if __name__ == "__main__":
    main()
