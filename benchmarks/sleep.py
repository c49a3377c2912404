"""Sleep on the default model (issue #3 evidence), one protocol per run:

    python benchmarks/sleep.py nap10       # paper Table 4: nap on 10 facts, recall with MEMIT reverted, time
    python benchmarks/sleep.py lifecycle   # paper Table 7: 5 facts, nap, 5 facts, deep sleep
    python benchmarks/sleep.py sixty       # 60 facts through naps and a deep sleep, then a new process

`--model PATH` and `--device cuda` run a protocol elsewhere than the default model on this CPU.

Facts are fictional people with two attributes each (`sleepwake.synthetic`).
Locality: real-world facts the base model completes correctly (`locality_facts`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

from common import save

from sleepwake.config import MemoryConfig
from sleepwake.corpus import locality_facts
from sleepwake.errors import ModelNotFoundError
from sleepwake.memory import Memory
from sleepwake.models import load_model
from sleepwake.synthetic import fictional_facts


def measure(mem: Memory, facts, step: str, memit_off: bool = False) -> dict:
    """Recall of `facts` and perplexity now (optionally with every MEMIT edit switched off)."""
    if memit_off:
        mem._rebuild([], None)
    try:
        r = mem.evaluate(facts)
    finally:
        mem._rebuild()
    row = {"step": step, "n": len(facts), "raw": r.raw_recall, "chat": r.chat_recall, "ppl": round(r.ppl, 3)}
    print(json.dumps(row), flush=True)
    return row


def locality(mem: Memory) -> dict:
    r = mem.evaluate(locality_facts())
    return {"locality_raw": r.raw_recall, "locality_chat": r.chat_recall}


def nap10(mem: Memory) -> dict:
    facts = fictional_facts(5, 2, seed=3)
    mem.inject(facts)
    rows = [measure(mem, facts, "after MEMIT")]
    t = time.perf_counter()
    rep = mem.nap()
    seconds = time.perf_counter() - t
    rows.append(measure(mem, facts, "after nap, MEMIT reverted", memit_off=True))
    return {"rows": rows, "nap_seconds": round(seconds, 1), "report": rep.to_dict(), **locality(mem)}


def lifecycle(mem: Memory) -> dict:
    facts = fictional_facts(5, 2, seed=5)
    first, second = facts[:5], facts[5:]
    rows = [measure(mem, facts, "baseline")]
    mem.inject(first)
    rows.append(measure(mem, first, "after 5 facts (MEMIT)"))
    nap = mem.nap()
    rows.append({**measure(mem, first, "after nap"), "cycle": nap.status, "consolidated": len(nap.consolidated)})
    mem.inject(second)
    rows.append(measure(mem, facts, "after 5 more facts (MEMIT)"))
    deep = mem.sleep()
    rows.append({**measure(mem, facts, "after deep sleep"), "cycle": deep.status,
                 "memit_left": len(mem.facts()) - len(mem.store.facts(where="consolidated"))})
    return {"rows": rows, "ppl_ratio_end": round(rows[-1]["ppl"] / rows[0]["ppl"], 4), **locality(mem)}


_CHILD = """
import json, sys
from sleepwake.memory import Memory
from sleepwake.config import MemoryConfig
from sleepwake.corpus import locality_facts
from sleepwake.synthetic import fictional_facts
mem = Memory(sys.argv[2] or None, home=sys.argv[1], config=MemoryConfig(progress=False), device=sys.argv[3] or None)
r = mem.evaluate(fictional_facts(30, 2, seed=9))
l = mem.evaluate(locality_facts())
print(json.dumps({"raw": r.raw_recall, "chat": r.chat_recall, "ppl": r.ppl, "locality_raw": l.raw_recall,
                  "locality_chat": l.chat_recall, "where": [x.where for x in mem.facts()].count("consolidated")}))
"""


def sixty(mem: Memory, model: str | None = None, device: str | None = None) -> dict:
    facts = fictional_facts(30, 2, seed=9)
    rows, cycles = [], []
    for i in range(0, 60, 20):
        mem.inject(facts[i : i + 20])
        cycles.append(mem.nap().to_dict())
        rows.append(measure(mem, facts[: i + 20], f"after {i + 20} facts and a nap"))
    cycles.append(mem.sleep().to_dict())
    rows.append(measure(mem, facts, "after deep sleep"))
    mem.close()
    child = [sys.executable, "-c", _CHILD, str(mem.home), model or "", device or ""]
    out = subprocess.run(child, capture_output=True, text=True, check=True)
    restart = json.loads(out.stdout.strip().splitlines()[-1])
    return {"rows": rows, "after_restart": restart, "cycles": [
        {k: c[k] for k in ("kind", "status", "chat_recall", "raw_recall", "ppl_before", "ppl_after", "seconds",
                           "consolidated", "kept", "reason")} for c in cycles]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("protocol", choices=["nap10", "lifecycle", "sixty"])
    ap.add_argument("--model", help="model path or id (default: the default model)")
    ap.add_argument("--device", help="e.g. cuda (default: where the model loads)")
    args = ap.parse_args()
    try:
        lm = load_model(args.model, device=args.device, progress=False)
    except ModelNotFoundError as exc:
        ap.error(str(exc))
    with tempfile.TemporaryDirectory() as home:
        mem = Memory(lm, home=home, config=MemoryConfig(progress=False))
        base = mem.evaluate(locality_facts())
        result = {"protocol": args.protocol, "base_locality_raw": base.raw_recall,
                  "base_locality_chat": base.chat_recall, "base_ppl": round(base.ppl, 3)}
        run = {"nap10": nap10, "lifecycle": lifecycle,
               "sixty": lambda m: sixty(m, args.model, args.device)}[args.protocol]
        result.update(run(mem))
    save(f"sleep-{args.protocol}", result)


if __name__ == "__main__":
    main()
