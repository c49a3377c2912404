"""Capacity curve (paper Table 2): cumulative recall as facts accumulate, batches of 5.

At each checkpoint: raw and chat recall of all facts injected so far, perplexity on
the fixed text, and locality (share of real-world facts the unedited model
completed correctly that it still completes correctly). Writes
results/capacity.json and results/capacity.png.

    python benchmarks/capacity.py [--max 200] [--layers 4-11] [--lambda 0.1] [--seeds 7,8,9]
        [--set v_steps=60 ...] [--no-guard] [--batch 5] [--model PATH] [--device cuda] [--quantize nf4]

`--merge A.json B.json … --name X` combines runs made apart (one process per fact set, as on
a GPU) into one result with its summary, goals and plot, refusing runs of different settings.

`--set chat_edit=false` edits raw completions only (the CLI's `--raw-only`); `--batch N`
injects N facts per call and solve instead of the paper's 5 (`--batch 100 --max 100`: all at once).

With several seeds (fact sets), each curve is kept and the summary gives each
metric's mean, min and max per checkpoint: a single run is one draw. The JSON's
"goals" (and the last lines printed) judge issue 2's goals at the checkpoints reached,
on the means; the plot marks them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import fields
from pathlib import Path

from common import RESULTS, save

from sleepwake.config import MemitConfig, MemoryConfig
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


def curve(cfg: MemoryConfig, facts: list, loc: list, model: str | None = None, device: str | None = None,
          batch: int = 5, quantize: str | None = None) -> dict:
    """One capacity curve: inject `facts` in batches of `batch`, measuring at each checkpoint."""
    with tempfile.TemporaryDirectory() as home:
        mem = Memory(model, home=home, config=cfg, device=device, progress=False, quantize=quantize)
        mem.editor()
        ppl0 = mem.perplexity()
        # Locality: real-world facts the unedited model gets right, as a raw completion
        # and as a chat answer; afterwards, the share of them still right.
        raw_known = [f for f, a in zip(loc, raw_completions(mem.model, mem.tokenizer, loc)) if recall([a], [f])]
        chat_known = [f for f, a in zip(loc, chat_answers(mem.model, mem.tokenizer, loc)) if recall([a], [f])]
        rows = []
        t_inject = 0.0
        v_steps: list[int] = []
        knocked = 0  # earlier facts knocked out by a batch's first try (then tried again)
        second = 0  # batches whose second try was kept
        for start in range(0, len(facts), batch):
            t = time.perf_counter()
            res = mem.inject(facts[start : start + batch])
            v_steps += [st.v_steps for st in res.stats]
            knocked += sum(st.knocked_out for st in res.stats)
            second += sum(st.second_try for st in res.stats)
            t_inject += time.perf_counter() - t
            n = start + batch
            if n in CHECKPOINTS or n == len(facts):
                rep = mem.evaluate(facts[:n])
                locality = recall(raw_completions(mem.model, mem.tokenizer, raw_known), raw_known)
                chat_locality = recall(chat_answers(mem.model, mem.tokenizer, chat_known), chat_known)
                row = {"facts": n, "raw_recall": rep.raw_recall, "chat_recall": rep.chat_recall,
                       "ppl": round(rep.ppl, 4), "ppl_change": round(rep.ppl / ppl0 - 1, 6),
                       "locality": round(locality, 4), "chat_locality": round(chat_locality, 4),
                       "inject_seconds_total": round(t_inject, 1),
                       "v_steps_mean": round(sum(v_steps) / len(v_steps), 1), "knocked_out_total": knocked,
                       "second_tries_kept": second}
                print(row, flush=True)
                rows.append(row)
        return {"layers": list(mem.layers), "ppl_base": round(ppl0, 4), "raw_locality_facts": len(raw_known),
                "chat_locality_facts": len(chat_known), "rows": rows}


METRICS = ("raw_recall", "chat_recall", "ppl_change", "locality", "chat_locality")


def summary(runs: list[dict]) -> list[dict]:
    """Per checkpoint, the mean, min and max of each metric over the runs: one run
    is one draw (outcomes move with the facts and with floating-point order)."""
    out = []
    for i, row in enumerate(runs[0]["rows"]):
        entry: dict = {"facts": row["facts"]}
        for m in METRICS:
            xs = [r["rows"][i][m] for r in runs]
            entry[m] = {"mean": round(sum(xs) / len(xs), 6), "min": min(xs), "max": max(xs)}
        out.append(entry)
    return out


GOALS = (  # issue 2's capacity goals: (metric, checkpoint, bound, direction)
    ("raw_recall", 100, 0.95, ">="),
    ("raw_recall", 200, 0.90, ">="),
    ("locality", 100, 0.95, ">="),
    ("ppl_change", 100, 0.01, "<="),
)


def goals(points: list[dict]) -> list[dict]:
    """Each goal at a checkpoint the curve reached, with its value and whether it is met.

    `points`: one dict per checkpoint, {"facts": n, metric: value, ...} (a run's rows, or
    the means over runs)."""
    at = {p["facts"]: p for p in points}
    out = []
    for metric, n, bound, direction in GOALS:
        if n in at:
            value = at[n][metric]
            met = value >= bound if direction == ">=" else value <= bound
            out.append({"metric": metric, "facts": n, "direction": direction, "bound": bound, "value": value,
                        "met": met})
    return out


def means(runs: list[dict]) -> list[dict]:
    """Per checkpoint, each metric's mean over the runs (a single run's rows as they are)."""
    if len(runs) == 1:
        return runs[0]["rows"]
    return [{"facts": e["facts"], **{m: e[m]["mean"] for m in METRICS}} for e in summary(runs)]


SHARED = ("machine", "lambda", "settings", "guard", "locality_facts", "batch", "model")  # equal in merged results
RUN_KEYS = ("seed", "layers", "ppl_base", "raw_locality_facts", "chat_locality_facts", "rows")


def merge(results: dict[str, dict]) -> dict:
    """One result from the results of separate runs (such as one process per fact set on
    a GPU), keyed by where each came from: their curves side by side, with the summary
    and goals over all of them. Results that differ in settings, machine or checkpoints,
    or that repeat a fact set, are refused with a ValueError naming them."""
    runs: list[dict] = []
    ref_name, ref = next(iter(results.items()))
    for name, result in results.items():
        if not isinstance(result, dict) or not ("rows" in result or "runs" in result):
            raise ValueError(f"{name}: not a capacity result (it has no 'rows' or 'runs')")
        for key in SHARED:
            if result.get(key) != ref.get(key):
                raise ValueError(f"{name}: {key} {result.get(key)!r} differs from {ref_name}'s {ref.get(key)!r}")
        runs += result["runs"] if "runs" in result else [{k: result[k] for k in RUN_KEYS if k in result}]
    checkpoints = [[row["facts"] for row in run["rows"]] for run in runs]
    if any(c != checkpoints[0] for c in checkpoints):
        raise ValueError(f"the runs stop at different checkpoints: {sorted(set(map(tuple, checkpoints)))}")
    seeds = [run["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"a fact set appears twice: seeds {seeds}")
    shared = {key: ref[key] for key in SHARED if key in ref}
    return {**shared, "date": max(str(r.get("date", "")) for r in results.values()),
            "merged": {name: r.get("command") for name, r in results.items()}, "seeds": seeds,
            "summary": summary(runs), "runs": runs, "goals": goals(means(runs))}


def seed_list(text: str) -> list[int]:
    """`--seeds 7,8,9` → [7, 8, 9]; anything else is a usage error that names the value."""
    try:
        seeds = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds repeat: {text!r}")
    return seeds


def batch_size(text: str) -> int:
    """`--batch N`: a positive number of facts per injection."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"batch must be a positive integer, got {text!r}")
    return n


def memit_setting(text: str) -> tuple[str, object]:
    """`--set name=value` for a field of `MemitConfig`, the value parsed as the field's type."""
    settable = {f.name: type(getattr(MemitConfig(), f.name)) for f in fields(MemitConfig)}
    settable = {name: kind for name, kind in settable.items() if kind in (int, float, bool, str)}
    name, eq, value = text.partition("=")
    if not eq or name not in settable:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME one of {sorted(settable)}, got {text!r}")
    kind = settable[name]
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return name, value.lower() in ("true", "1")
        return name, kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} expects {kind.__name__}, got {value!r}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--max", type=int, default=200)
    ap.add_argument("--layers")
    ap.add_argument("--lambda", dest="lam", type=float)
    ap.add_argument("--seeds", type=seed_list, default=[7],
                    help="comma-separated seeds of the fictional facts, one curve each")
    ap.add_argument("--set", dest="settings", type=memit_setting, action="append", default=[],
                    metavar="NAME=VALUE", help="a MemitConfig field, e.g. --set lambda_reg=20 (repeatable)")
    ap.add_argument("--model", help="model path or id (default: the default model)")
    ap.add_argument("--device", help="e.g. cuda (default: where the model loads)")
    ap.add_argument("--quantize", choices=["nf4"], help="load the base model's linear maps in 4-bit NF4 (issue 27)")
    ap.add_argument("--no-guard", action="store_true",
                    help="keep a batch's first edit even where it knocks out earlier facts (MemoryConfig.guard)")
    ap.add_argument("--batch", type=batch_size, default=5, help="facts per injection (default 5, as the paper)")
    ap.add_argument("--name", default="capacity")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="instead of running, merge these results (one per fact set, same settings) into --name")
    args = ap.parse_args()
    if args.merge:
        loaded = {}
        for path in args.merge:
            try:
                with open(path, encoding="utf-8") as f:
                    loaded[path] = json.load(f)
            except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
                ap.error(f"--merge: cannot read {path}: {exc}")
        try:
            merged = merge(loaded)
        except ValueError as exc:
            ap.error(f"--merge: {exc}")
        publish(args.name, merged, merged["runs"])
        return
    changes = dict(args.settings)
    if args.layers:
        changes["layers"] = parse_layers(args.layers)
    if args.lam:
        changes["lambda_reg"] = args.lam
    try:
        cfg = MemoryConfig(progress=False, guard=not args.no_guard, batch_size=args.batch).with_memit(**changes)
    except ValueError as exc:  # a value of the right type that the config refuses
        ap.error(str(exc))
    loc = locality_facts()
    runs = []
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        runs.append({"seed": seed, **curve(cfg, fictional_facts(args.max // 2, 2, seed=seed)[: args.max], loc,
                                                args.model, args.device, args.batch, args.quantize)})
    result = {"lambda": cfg.memit.lambda_reg, "settings": changes, "guard": cfg.guard, "batch": args.batch,
              "model": args.model, "quantize": args.quantize, "locality_facts": len(loc), "seeds": args.seeds}
    if len(runs) == 1:
        result |= runs[0]
    else:
        result |= {"summary": summary(runs), "runs": runs}
    result["goals"] = goals(means(runs))
    publish(args.name, result, runs)


def publish(name: str, result: dict, runs: list[dict]) -> None:
    """Write results/<name>.json and .png, and print how the goals fared."""
    save(name, result)
    for g in result["goals"]:
        print(f"goal {g['metric']} at {g['facts']} facts {g['direction']} {g['bound']}: {g['value']} "
              f"({'met' if g['met'] else 'missed'})", flush=True)
    plot(runs, RESULTS / f"{name}.png", result.get("model"), result.get("batch") or 5)


def plot(runs: list[dict], path, model: str | None = None, batch: int = 5) -> None:
    """Write the capacity figure (`figure`) as a PNG."""
    import matplotlib.pyplot as plt

    fig = figure(runs, model, batch)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure(runs: list[dict], model: str | None = None, batch: int = 5):
    """Each metric's mean over the runs, with its range (min to max) shaded, and the
    goals (hollow diamonds) at the checkpoints reached."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["facts"] for r in runs[0]["rows"]]
    series = lambda m: [[run["rows"][i][m] for run in runs] for i in range(len(n))]
    fig, ax = plt.subplots(figsize=(7, 4))
    for m, style, label in (("raw_recall", "o-", "raw recall"), ("chat_recall", "s-", "chat recall"),
                            ("locality", "^-", "locality, raw (real-world facts kept)"),
                            ("chat_locality", "v-", "locality, chat")):
        xs = series(m)
        line, = ax.plot(n, [sum(x) / len(x) for x in xs], style, label=label)
        if len(runs) > 1:
            ax.fill_between(n, [min(x) for x in xs], [max(x) for x in xs], color=line.get_color(), alpha=0.15)
    ax.plot([40, 60], [0.82, 0.83], "kx", label="paper, 8B raw recall")
    reached = goals(means(runs))
    shares = [(g["facts"], g["bound"]) for g in reached if g["metric"] != "ppl_change"]
    if shares:
        ax.plot(*zip(*shares), "D", mfc="none", mec="k", ms=9, label="goal: raw recall, locality")
    ax.set_xscale("log")
    ax.set_xticks(n, [str(x) for x in n])
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(f"facts injected (batches of {batch})")
    ax.set_ylabel("share")
    ax2 = ax.twinx()
    ppl = series("ppl_change")
    ax2.plot(n, [100 * sum(x) / len(x) for x in ppl], "r--", label="perplexity change (%)")
    for g in reached:
        if g["metric"] == "ppl_change":
            ax2.plot([g["facts"]], [100 * g["bound"]], "D", mfc="none", mec="r", ms=9, label="goal: perplexity change")
    ax2.set_ylabel("perplexity change (%)", color="r")
    fig.legend(loc="lower left", bbox_to_anchor=(0.1, 0.18), fontsize=8)
    seeds = f" (mean of {len(runs)} fact sets, range shaded)" if len(runs) > 1 else ""
    name = Path(model).name if model else "SmolLM2-135M-Instruct"
    ax.set_title(f"MEMIT capacity on {name}{seeds}", fontsize=10)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
