"""The same edit beside two bases (issue 27): does NF4 lose locality because of its edits, or
because of its base?

MEMIT writes `--facts` facts into the float32 model (batches of 5, MEMIT only, as
`capacity.py`). Its delta sums on the edited down-projections are then put beside the NF4
model's 4-bit weights unchanged, and locality (the share of real-world facts each base
completes right that it still completes right) is measured on both. Then the NF4 model's own
MEMIT edits of the same facts, for the third figure. If the float32 edit costs NF4 as much
locality as NF4's own, the base is what is fragile (`margins.py`); if it costs NF4 as little as
float32, NF4's own edits are.

    python benchmarks/transfer.py --model gemma-3-270m-q4_k_m.gguf --facts 100 --seed 8
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch
from common import known_facts, save

from sleepwake.config import MemoryConfig
from sleepwake.corpus import locality_facts
from sleepwake.evaluate import raw_completions, recall
from sleepwake.memory import Memory
from sleepwake.models import load_model
from sleepwake.synthetic import fictional_facts
from sleepwake.weights import LiveWeights


def put(lm: Any, deltas: dict[str, torch.Tensor]) -> LiveWeights:
    """`lm`'s live weights set to its base plus `deltas` (beside a 4-bit weight); `rebuild({})`
    on the result puts the base back."""
    live = LiveWeights(lm, deltas)
    live.rebuild({n: [(d, torch.eye(d.shape[1]))] for n, d in deltas.items()})
    return live


def edited(lm: Any, facts: list, cache_dir: str | None) -> tuple[dict[str, torch.Tensor], float]:
    """Inject `facts` in batches of 5 (MEMIT only) into a fresh home on `lm`; the delta sum per
    edited module, and the raw recall of the facts."""
    with tempfile.TemporaryDirectory() as home:
        with Memory(lm, home=home, config=MemoryConfig(progress=False), cache_dir=cache_dir, progress=False) as mem:
            for i in range(0, len(facts), 5):
                mem.inject(facts[i : i + 5])
            raw = mem.evaluate(facts).raw_recall
            return {n: mem.weights.sum[n].clone() for n in mem.weights.names}, raw


def locality(lm: Any, base_known: list) -> float:
    return recall(raw_completions(lm.model, lm.tokenizer, base_known), base_known)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model path or id (default: the default model)")
    ap.add_argument("--facts", type=int, default=100)
    ap.add_argument("--seed", type=int, default=8)
    ap.add_argument("--cache-dir", help="converted weights and Ĉ (default: the product's cache)")
    args = ap.parse_args()
    loc = locality_facts()
    facts = fictional_facts(args.facts // 2, 2, seed=args.seed)[: args.facts]  # as capacity.py makes them
    out: dict[str, Any] = {"model": args.model or "default", "facts": args.facts, "seed": args.seed}

    fp32 = load_model(args.model, cache_dir=args.cache_dir, progress=False)
    fp32_known = known_facts(fp32, loc)
    deltas, raw = edited(fp32, facts, args.cache_dir)
    put(fp32, deltas)
    out["float32_own_edit"] = {"raw_recall": raw, "locality": locality(fp32, fp32_known), "known": len(fp32_known)}
    print("float32, its own edit:", out["float32_own_edit"], flush=True)
    norms = {n: round(d.norm().item(), 4) for n, d in deltas.items()}
    del fp32

    nf4 = load_model(args.model, cache_dir=args.cache_dir, progress=False, quantize="nf4")
    nf4_known = known_facts(nf4, loc)
    live = put(nf4, deltas)  # float32's edit, beside the 4-bit weights
    out["nf4_float32_edit"] = {"locality": locality(nf4, nf4_known), "known": len(nf4_known)}
    print("NF4, float32's edit:", out["nf4_float32_edit"], flush=True)
    live.rebuild({})  # back to the NF4 base
    own, raw = edited(nf4, facts, args.cache_dir)
    put(nf4, own)
    out["nf4_own_edit"] = {"raw_recall": raw, "locality": locality(nf4, nf4_known), "known": len(nf4_known)}
    print("NF4, its own edit:", out["nf4_own_edit"], flush=True)
    out["delta_norm"] = {"float32": norms, "nf4": {n: round(d.norm().item(), 4) for n, d in own.items()}}
    save(f"transfer-{'gemma' if args.model and 'gemma' in args.model else 'smollm2'}-s{args.seed}", out)


if __name__ == "__main__":
    main()
