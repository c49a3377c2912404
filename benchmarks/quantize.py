"""float32 and NF4 (`--quantize nf4`) side by side on one model (issue 27 §1):

    python benchmarks/quantize.py [--facts 40] [--model PATH] [--device cuda] [--name quantize]

Per scheme, in a fresh process each (so that its memory is its own): load time, the
model's tensor bytes (its state dict: 4-bit weights with their quantization constants),
the process's resident memory after loading and one forward pass, split into anonymous
memory and file pages, and at its peak; the time to inject each batch of 5 fictional
facts, raw and chat recall of them all and perplexity, then a nap (the default keyed
consolidation) and recall and perplexity after it.

Resident file pages are the safetensors file, which transformers keeps mapped: the float32
weights are those pages; the NF4 model's float embeddings are a view into them, and the
pages read while quantizing stay counted until the kernel reclaims them (they are clean:
it may at any time). Anonymous memory is what the process cannot give back.

Ĉ is read from the cache (`$SLEEPWAKE_CACHE`), computed first if absent: each scheme has
its own (the 4-bit model's keys are not the float model's). Its time is not counted.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from common import save


def resident_mb() -> dict[str, float]:
    """Resident memory of this process now, anonymous and file pages (Linux /proc)."""
    with open("/proc/self/status") as f:
        kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("RssAnon", "RssFile")}
    return {"anon": kb["RssAnon"] / 1024, "file": kb["RssFile"] / 1024}


def tensor_mb(model) -> float:
    """The model's state dict in MB, each storage once (a tied LM head shares the embedding's)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total / 2**20


def one(scheme: str, n_facts: int, model: str | None, device: str | None) -> dict:
    """The whole protocol for one scheme, in this process."""
    from sleepwake.config import MemoryConfig
    from sleepwake.memory import Memory
    from sleepwake.models import load_model
    from sleepwake.synthetic import fictional_facts

    import torch

    quantize = None if scheme == "float32" else scheme
    before = resident_mb()
    t = time.perf_counter()
    lm = load_model(model, device=device, progress=False, quantize=quantize)
    load_s = time.perf_counter() - t
    with torch.no_grad():  # every weight read once
        lm.model(torch.tensor([[1, 2, 3, 4]], device=lm.device))
    now = resident_mb()
    out = {"scheme": scheme, "model": lm.name, "load_s": round(load_s, 1), "tensors_mb": round(tensor_mb(lm.model), 1),
           "loaded_anon_mb": round(now["anon"] - before["anon"], 1),
           "loaded_file_mb": round(now["file"] - before["file"], 1)}
    facts = fictional_facts(n_facts, 1, seed=11)
    with tempfile.TemporaryDirectory() as home:
        mem = Memory(lm, home=home, config=MemoryConfig(progress=False))
        mem.editor()  # Ĉ, from the cache
        out["ppl_base"] = round(mem.base_perplexity(), 3)
        times = []
        for i in range(0, n_facts, 5):
            t = time.perf_counter()
            mem.inject(facts[i : i + 5])
            times.append(round(time.perf_counter() - t, 1))
            print(f"{scheme}: {i + 5} facts, batch {times[-1]} s", file=sys.stderr, flush=True)
        r = mem.evaluate(facts)
        out.update(inject5_s=times, inject5_median_s=statistics.median(times), raw=r.raw_recall, chat=r.chat_recall,
                   ppl=round(r.ppl, 3))
        t = time.perf_counter()
        rep = mem.nap()
        out.update(nap_s=round(time.perf_counter() - t, 1), nap=rep.status, consolidated=len(rep.consolidated))
        r = mem.evaluate(facts)
        out.update(raw_after_nap=r.raw_recall, chat_after_nap=r.chat_recall, ppl_after_nap=round(r.ppl, 3))
        out["delta_mb"] = round(sum(s.numel() * s.element_size() for s in mem.weights.sum.values()) / 2**20, 1)
        mem.close()
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


COLUMNS = ("scheme", "tensors_mb", "loaded_anon_mb", "loaded_file_mb", "peak_rss_mb", "delta_mb", "load_s",
           "inject5_median_s", "raw", "chat", "ppl_base", "ppl", "nap", "nap_s", "consolidated", "raw_after_nap",
           "chat_after_nap", "ppl_after_nap")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", type=int, default=40, help="facts to inject, in batches of 5 (default 40)")
    ap.add_argument("--model", help="model path or id (default: the default model)")
    ap.add_argument("--device", help="e.g. cuda (default: where the model loads, the CPU)")
    ap.add_argument("--schemes", nargs="+", default=["float32", "nf4"], choices=["float32", "nf4"])
    ap.add_argument("--name", default="quantize", help="results/NAME.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # run one scheme here, print its row as JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.facts, args.model, args.device)))
        return
    rows = []
    for scheme in args.schemes:
        cmd = [sys.executable, __file__, "--one", scheme, "--facts", str(args.facts)]
        cmd += ["--model", args.model] if args.model else []
        cmd += ["--device", args.device] if args.device else []
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(" | ".join(COLUMNS))
    for row in rows:
        print(" | ".join(str(row.get(c)) for c in COLUMNS))
    save(args.name, {"facts": args.facts, "rows": rows})


if __name__ == "__main__":
    main()
