"""The torch and MLX backends side by side on the default model (issue 27 §2):

    python benchmarks/mlx_bench.py [--facts 40] [--backends torch mlx] [--name mlx-smollm2-cpu]
                                   [--consolidation keyed|lora] [--keep-trained] [--no-demo]

Per backend, in a fresh process each, each with a home of its own: the demo facts
(`sleepwake.demo.FACTS`) injected and their raw and chat recall (unless --no-demo); then
held facts (fictional, `synthetic.fictional_facts(n, 1, seed=11)`) injected in batches of
5 with the time of each batch, raw and chat recall of all of them, a nap (the default
keyed consolidation, or with --consolidation lora a LoRA nap, trained on that backend;
--keep-trained keeps its trained part even where the take-over alone answers as many
facts, `SleepConfig.keep_training_only_if_better=False`) and recall after it; the nap's own measures too (`CycleReport`: recall with the MEMIT
edits off, perplexity before, after and of the base model, training time). Then each
backend reads the other's home and recalls its held facts (the shared store). Ĉ comes
from the cache both backends share (computed first if absent; not timed).

Both backends run the same injection and sleep code (`sleepwake.writes`,
`sleepwake.memory_base`: guard on, the nap's perplexity and locality budget); the
results in results/mlx-smollm2-cpu*.json were measured before the MLX backend had the
guard and the budget.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import save


def recall(mem, facts) -> dict:
    r = mem.evaluate(facts)
    return {"raw": r.raw_recall, "chat": r.chat_recall,
            "misses": [f"{x.subject} | {x.relation} | {x.object}: {x.raw_completion!r} / {x.chat_answer!r}"
                       for x in r.facts if not (x.raw_ok and x.chat_ok)]}


def one(backend: str, n_facts: int, home: Path, consolidation: str, demo: bool, keep_trained: bool) -> dict:
    """The protocol for one backend, in this process."""
    from sleepwake.backends import check_backend

    check_backend(backend)
    from sleepwake.config import MemoryConfig, SleepConfig
    from sleepwake.demo import FACTS
    from sleepwake.memory import Memory
    from sleepwake.synthetic import fictional_facts

    t = time.perf_counter()
    mem = Memory(home=home / "demo", config=MemoryConfig(progress=False), backend=backend)
    out: dict = {"backend": backend, "consolidation": consolidation, "load_s": round(time.perf_counter() - t, 1)}
    mem.editor()  # Ĉ and its inverse: not counted in the injection times
    if demo:
        t = time.perf_counter()
        mem.inject(FACTS)
        out["demo_inject_s"] = round(time.perf_counter() - t, 1)
        out["demo"] = recall(mem, FACTS)
    mem.close()
    facts = fictional_facts(n_facts, 1, seed=11)
    mem = Memory(mem.mm if backend == "mlx" else mem.lm, home=home / "held",
                 config=MemoryConfig(progress=False, consolidation=consolidation,
                                     nap=SleepConfig(keep_training_only_if_better=not keep_trained)), backend=backend)
    times = []
    for i in range(0, n_facts, 5):
        t = time.perf_counter()
        mem.inject(facts[i: i + 5])
        times.append(round(time.perf_counter() - t, 1))
        print(f"{backend}: {i + 5} facts, batch {times[-1]} s", file=sys.stderr, flush=True)
    out.update(inject5_s=times, inject5_median_s=statistics.median(times), held=recall(mem, facts))
    t = time.perf_counter()
    rep = mem.nap()
    out.update(nap_s=round(time.perf_counter() - t, 1), nap=rep.status, consolidated=len(rep.consolidated),
               after_nap=recall(mem, facts))
    out["nap_report"] = {
        "chat_recall_memit_off": rep.chat_recall, "raw_recall_memit_off": rep.raw_recall, "kept": len(rep.kept),
        "ppl_before": rep.ppl_before, "ppl_after": rep.ppl_after, "ppl_base": rep.ppl_base,
        "ppl_after_vs_base": rep.ppl_after / rep.ppl_base - 1 if rep.ppl_after and rep.ppl_base else None,
        "locality_after": rep.locality_after, "train_steps": rep.train_steps, "train_loss": rep.train_loss,
        "trained_part_dropped": rep.trained_part_dropped, "phases_s": rep.phases, "reason": rep.reason}
    mem.close()
    return out


def cross(backend: str, home: Path, n_facts: int) -> dict:
    """Recall of the held facts of a home the other backend wrote (after its nap)."""
    from sleepwake.backends import check_backend

    check_backend(backend)
    from sleepwake.config import MemoryConfig
    from sleepwake.memory import Memory
    from sleepwake.synthetic import fictional_facts

    with Memory(home=home / "held", config=MemoryConfig(progress=False), backend=backend) as mem:
        return recall(mem, fictional_facts(n_facts, 1, seed=11))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", type=int, default=40, help="held facts, in batches of 5 (default 40)")
    ap.add_argument("--backends", nargs="+", default=["torch", "mlx"], choices=["torch", "mlx"])
    ap.add_argument("--name", default="mlx-smollm2-cpu", help="results/NAME.json")
    ap.add_argument("--consolidation", default="keyed", choices=["keyed", "lora"], help="how the nap consolidates")
    ap.add_argument("--keep-trained", action="store_true", help="a LoRA nap keeps its trained part")
    ap.add_argument("--no-demo", dest="demo", action="store_false", help="skip the demo facts' home")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # run one backend here, print its row as JSON
    ap.add_argument("--cross", help=argparse.SUPPRESS)  # read the other backend's home here
    ap.add_argument("--home", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one or args.cross:
        run = one(args.one, args.facts, Path(args.home), args.consolidation, args.demo, args.keep_trained) if args.one \
            else cross(args.cross, Path(args.home), args.facts)
        print(json.dumps(run))
        return

    def child(*extra: str) -> dict:
        flags = ["--facts", str(args.facts), "--consolidation", args.consolidation, *([] if args.demo else ["--no-demo"]),
                 *(["--keep-trained"] if args.keep_trained else [])]
        proc = subprocess.run([sys.executable, __file__, *flags, *extra], stdout=subprocess.PIPE, text=True, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as tmp:
        homes = {b: Path(tmp) / b for b in args.backends}
        rows = [child("--one", b, "--home", str(homes[b])) for b in args.backends]
        if len(args.backends) == 2:
            for row, other in zip(rows, reversed(args.backends)):
                row["reads_other_home"] = child("--cross", row["backend"], "--home", str(homes[other]))
    cols = ("backend", "demo_inject_s", "inject5_median_s", "nap_s", "consolidated")
    print(" | ".join(cols) + " | demo raw/chat | held raw/chat | after nap raw/chat | MEMIT off raw/chat | "
          "ppl after/base | other's home raw/chat")
    for row in rows:
        pair = lambda r: f"{r['raw']:.3f}/{r['chat']:.3f}" if r else "-"
        nap = row["nap_report"]
        off = f"{nap['raw_recall_memit_off']}/{nap['chat_recall_memit_off']}"
        ppl = f"{nap['ppl_after_vs_base']:+.2%}" if nap["ppl_after_vs_base"] is not None else "-"
        print(" | ".join(str(row.get(c)) for c in cols), "|", pair(row.get("demo")), "|", pair(row["held"]), "|",
              pair(row["after_nap"]), "|", off, "|", ppl, "|", pair(row.get("reads_other_home")))
    save(args.name, {"facts": args.facts, "model": "smollm2-135m-instruct", "consolidation": args.consolidation,
                     "keep_trained": args.keep_trained, "rows": rows})


if __name__ == "__main__":
    main()
