"""Lifelong memory (issue 25): 1,000 facts through sleep without breaking the model.

Fictional people with four to six attributes each (`synthetic.lifelong_facts`) are told
to the default model the way a user would tell them: a person's facts arrive at
different times, mixed with other people's, in batches of 5 through `Memory.inject`
with `MemoryConfig(auto_sleep=True)` and otherwise the product defaults, so naps and
deep sleeps come when the sleep pressure calls for them. At each checkpoint (40, 100,
200, 400, 1000, 2000 facts, up to `--max`) it measures, on all facts told so far: raw
and chat recall, locality (real-world facts the base model got right that it still gets
right, raw and chat, as in capacity.py), the perplexity change over the base model, the
naps and deep sleeps so far (accepted, rejected) and the seconds spent injecting and
sleeping. Then `--changes N` facts are updated (a new object) and N others forgotten,
and it measures whether only the new objects are recalled, the forgotten facts are gone
and the rest are unchanged. At the end a new process opens the same home and measures
it all again (and whether it rebuilt bitwise the same weights).

    python benchmarks/lifelong.py [--max 1000] [--sets 3 | --seeds 1,2,3] [--device cuda]
        [--batch 5] [--checkpoints 40,100,200,400,1000,2000] [--changes 20] [--model PATH]
        [--out lifelong] [--quiet]
    python benchmarks/lifelong.py --seeds K --keep DIR [--until N] ...   (resumable, one fact set)
    python benchmarks/lifelong.py --merge A.json B.json ... [--out NAME]

Writes results/NAME.json (machine, date, git commit, configuration, every fact set's
curve, the means, the goals) and results/NAME.png, and prints a table per checkpoint
(the mean over fact sets, then each set) and whether each goal of issue 25 was met, on
the unrounded means at the checkpoints reached. `--merge` joins fact sets run in
separate processes (one per GPU, say) into one result, refusing runs that differ.
`--keep DIR` keeps one fact set's run at each checkpoint (a copy of the home and the curve
so far), and the same command later resumes it there: 2,000 facts outlast one GPU lease.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capacity import batch_size, seed_list
from common import RESULTS, save
from tqdm.auto import tqdm

from sleepwake.config import MemoryConfig
from sleepwake.corpus import locality_facts
from sleepwake.errors import ModelNotFoundError
from sleepwake.evaluate import chat_answers, evaluate_facts, raw_completions, recall
from sleepwake.facts import Fact
from sleepwake.inference import rows_per_pass
from sleepwake.memory import Memory
from sleepwake.models import LoadedModel, load_model
from sleepwake.synthetic import SHORT_NAMES, changed_facts, lifelong_facts

HERE = Path(__file__).resolve().parent
CHECKPOINTS = (40, 100, 200, 400, 1000, 2000)
METRICS = ("raw_recall", "chat_recall", "locality", "chat_locality", "ppl_change")
GENERATOR = {"function": "lifelong_facts", "attributes": [4, 6], "spread": 100}
SHORT_SPREAD = 16  # --names short: the 16 people arrive over 16 facts' time, all of them among 48 facts
GOALS = (  # issue 25: (metric, checkpoint, bound, direction); 2000 facts is reported, not judged
    ("raw_recall", 200, 0.97, ">="), ("chat_recall", 200, 0.95, ">="),
    ("locality", 200, 0.97, ">="), ("ppl_change", 200, 0.02, "<="),
    ("raw_recall", 1000, 0.95, ">="), ("chat_recall", 1000, 0.90, ">="),
    ("locality", 1000, 0.95, ">="), ("ppl_change", 1000, 0.03, "<="),
)
SHARED = ("benchmark", "machine", "commit", "model", "device", "batch", "max", "checkpoints", "changes", "config",
          "locality_facts", "generator")  # equal in results that may be merged


# --- the schedule ---------------------------------------------------------------


def checkpoints_upto(points: Sequence[int], n: int) -> list[int]:
    """The checkpoints a run of `n` facts reaches, always ending at `n` itself."""
    return sorted({p for p in points if 0 < p < n} | {n})


def spans(stops: Sequence[int], batch: int) -> list[tuple[int, int]]:
    """(start, end) of each injection: batches of `batch` that never straddle a
    checkpoint, so that each checkpoint measures exactly that many facts."""
    out, prev = [], 0
    for stop in stops:
        out += [(s, min(s + batch, stop)) for s in range(prev, stop, batch)]
        prev = stop
    return out


# --- measuring ------------------------------------------------------------------


@dataclass
class Baseline:
    """What the unedited model did, measured once per fact set: its perplexity and
    the real-world facts it got right (raw and chat), against which locality counts."""

    ppl: float
    raw_known: list[Fact]
    chat_known: list[Fact]

    @classmethod
    def of(cls, mem: Memory, loc: Sequence[Fact]) -> Baseline:
        raw = [f for f, a in zip(loc, raw_completions(mem.model, mem.tokenizer, loc)) if recall([a], [f])]
        chat = [f for f, a in zip(loc, chat_answers(mem.model, mem.tokenizer, loc)) if recall([a], [f])]
        return cls(mem.perplexity(), raw, chat)

    def to_dict(self) -> dict[str, Any]:
        return {"ppl": self.ppl, "raw_known": [f.to_dict() for f in self.raw_known],
                "chat_known": [f.to_dict() for f in self.chat_known]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Baseline:
        return cls(d["ppl"], [Fact.from_dict(f) for f in d["raw_known"]], [Fact.from_dict(f) for f in d["chat_known"]])


def measure(mem: Memory, facts: Sequence[Fact], base: Baseline, progress: bool) -> dict[str, Any]:
    """Recall of `facts`, locality and perplexity of the live weights, unrounded.

    Recall is `Memory.evaluate`'s (batched greedy generation, each row stopped once it
    names its object); locality is capacity.py's, on the facts the base model knew."""
    t = time.perf_counter()
    # 64 rows a generation on a CPU; a GPU takes `rows_per_pass` (256) at once
    rows = max(64, rows_per_pass(mem.lm.device))
    rep = evaluate_facts(mem.model, mem.tokenizer, facts, None, batch=rows, progress=progress)
    raw_loc = recall(raw_completions(mem.model, mem.tokenizer, base.raw_known), base.raw_known)
    chat_loc = recall(chat_answers(mem.model, mem.tokenizer, base.chat_known), base.chat_known)
    ppl = mem.perplexity()
    return {"raw_recall": rep.raw_recall, "chat_recall": rep.chat_recall, "locality": raw_loc,
            "chat_locality": chat_loc, "ppl": ppl, "ppl_change": ppl / base.ppl - 1,
            "eval_seconds": round(time.perf_counter() - t, 1)}


def cycle_counts(history: Sequence[dict]) -> dict[str, int]:
    """Sleep cycles so far by kind and outcome, e.g. {"nap accepted": 3, "nap rejected": 1}."""
    out: dict[str, int] = {}
    for c in history:
        key = f"{c['kind']} {c['status']}"
        out[key] = out.get(key, 0) + 1
    return out


# --- one fact set -----------------------------------------------------------------


def run_set(lm: LoadedModel, seed: int, facts: Sequence[Fact], cfg: MemoryConfig, loc: Sequence[Fact],
            stops: Sequence[int], batch: int, model: str | None = None, device: str | None = None,
            progress: bool = True, changes: int = 0, keep: Kept | None = None,
            until: int | None = None) -> dict[str, Any] | None:
    """Tell `facts` in batches through `Memory.inject` in a fresh home, measuring at each
    of `stops`; then update and forget `changes` facts each; then measure the same home
    again in a new process (`model` and `device` name the model there, as `load_model`
    takes them). With `keep`, the run starts where a kept one stopped and is kept at each
    checkpoint; with `until`, it stops after that checkpoint (None is returned)."""
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        state = keep.restore(home) if keep else None
        mem = Memory(lm, home=home, config=cfg, progress=False)
        mem.editor()  # Ĉ is computed (or read) before the clock starts
        if state is None:
            state = {"told": 0, "base": Baseline.of(mem, loc).to_dict(), "rows": [], "sleeps": [],
                     "seconds": {"inject": 0.0, "sleep": 0.0}}
        base = Baseline.from_dict(state["base"])
        rows, sleeps, seconds = state["rows"], state["sleeps"], state["seconds"]
        bar = tqdm(total=len(facts), initial=state["told"], desc=f"fact set {seed}", unit="fact",
                   disable=not progress)
        for start, end in spans(stops, batch):
            if end <= state["told"]:
                continue
            sleeps += tell(mem, facts[start:end], end, seconds)
            bar.update(end - start)
            bar.set_postfix(sleeps=len(sleeps))
            if end in stops:
                rows.append(checkpoint(mem, facts[:end], base, seconds, progress))
                bar.write(row_line(str(seed), rows[-1]))
                state["told"] = end
                if keep:
                    mem.close()  # a consistent copy of the home, then the same memory again
                    keep.save(home, state)
                    mem = Memory(lm, home=home, config=cfg, progress=False)
                if until is not None and end >= until and end < len(facts):
                    mem.close()
                    bar.close()
                    return None
        bar.close()
        changed = change(mem, list(facts), changes, seed, seconds) if changes else None
        if changed:
            print(change_line(str(seed), changed), flush=True)
        digest = lm.weights_digest()
        layers = list(mem.layers)
        final = [r.fact for r in mem.facts()]
        mem.close()  # the home is the new process's now
        restart = recheck(home, final, base, digest, model, device)
        print(row_line(f"{seed} new", {"facts": len(final), **restart}), flush=True)
    return {"seed": seed, "layers": layers, "ppl_base": base.ppl, "raw_locality_facts": len(base.raw_known),
            "chat_locality_facts": len(base.chat_known), "rows": rows, "sleeps": sleeps, "changes": changed,
            "restart": restart}


class Kept:
    """`--keep DIR`: one fact set's run as it stood at its last checkpoint, so that a run cut
    short (by `--until`, or a GPU lease that ends) goes on from there in a later process.

    DIR/checkpoint-N holds a copy of the home after N facts and state.json (the curve so
    far, the base model's figures, seconds spent, and the run's settings, which a resumed
    run must share); DIR/latest names the newest, replaced atomically once it is whole."""

    def __init__(self, root: Path, settings: dict[str, Any]) -> None:
        self.root = root
        self.settings = settings

    def restore(self, home: Path) -> dict[str, Any] | None:
        """Copy the kept home to `home` and return the state; None if nothing is kept yet."""
        latest = self.root / "latest"
        if not latest.exists():
            return None
        where = self.root / latest.read_text(encoding="utf-8").strip()
        state = json.loads((where / "state.json").read_text(encoding="utf-8"))
        if state["settings"] != self.settings:
            raise ValueError(f"{self.root} keeps a run of other settings: {state['settings']} "
                             f"(this run: {self.settings})")
        shutil.copytree(where / "home", home)
        print(f"resuming fact set {self.settings['seed']} after {state['told']} facts from {where}", flush=True)
        return state

    def save(self, home: Path, state: dict[str, Any]) -> None:
        """Keep a copy of the (closed) home and `state`; older checkpoints are removed."""
        name = f"checkpoint-{state['told']}"
        where = self.root / name
        shutil.rmtree(where, ignore_errors=True)
        shutil.copytree(home, where / "home")
        (where / "state.json").write_text(json.dumps({**state, "settings": self.settings}), encoding="utf-8")
        tmp = self.root / "latest.tmp"
        tmp.write_text(name, encoding="utf-8")
        os.replace(tmp, self.root / "latest")
        for old in self.root.glob("checkpoint-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)


def change(mem: Memory, told: list[Fact], n: int, seed: int, seconds: dict[str, float]) -> dict[str, Any]:
    """Update `n` facts and forget `n` others (`synthetic.changed_facts`), then measure:
    recall of the new objects, how many old objects and forgotten facts are still
    answered (raw or chat: either counts as not gone), and recall of the rest against
    before. Updates arrive in batches of 5, through auto sleep, as facts do."""
    updates, forgets = changed_facts(told, n, seed)
    touched = {f.key for f, _ in updates} | {f.key for f in forgets}
    rest = [f for f in told if f.key not in touched]
    before = evaluate_facts(mem.model, mem.tokenizer, rest, None, batch=64, progress=False)
    t = time.perf_counter()
    ids = {r.fact.key: r.id for r in mem.facts()}
    for f in forgets:
        mem.forget(ids[f.key])
    for i in range(0, len(updates), 5):
        tell(mem, [new for _, new in updates[i:i + 5]], len(told), seconds)
    spent = time.perf_counter() - t
    new = evaluate_facts(mem.model, mem.tokenizer, [b for _, b in updates], None, batch=64, progress=False)
    old = evaluate_facts(mem.model, mem.tokenizer, [a for a, _ in updates], None, batch=64, progress=False)
    gone = evaluate_facts(mem.model, mem.tokenizer, forgets, None, batch=64, progress=False)
    after = evaluate_facts(mem.model, mem.tokenizer, rest, None, batch=64, progress=False)
    same = sum(a.raw_ok == b.raw_ok and a.chat_ok == b.chat_ok for a, b in zip(before.facts, after.facts))
    return {"updates": n, "forgets": n, "seconds": round(spent, 1),
            "new_raw_recall": new.raw_recall, "new_chat_recall": new.chat_recall,
            "old_objects_answered": answered(old), "forgotten_answered": answered(gone),
            "rest_unchanged": same / max(1, len(rest)), "rest_raw_recall": after.raw_recall,
            "rest_chat_recall": after.chat_recall, "rest_raw_recall_before": before.raw_recall,
            "rest_chat_recall_before": before.chat_recall}


def answered(report: Any) -> float:
    """Share of facts answered by raw prompt or chat question."""
    return sum(r.raw_ok or r.chat_ok for r in report.facts) / max(1, len(report.facts))


def change_line(label: str, c: dict[str, Any]) -> str:
    return (f"{label}: {c['updates']} updates, {c['forgets']} forgets in {c['seconds']:.0f} s: new objects raw "
            f"{c['new_raw_recall']:.2f} chat {c['new_chat_recall']:.2f}; old objects still answered "
            f"{c['old_objects_answered']:.2f}; forgotten still answered {c['forgotten_answered']:.2f}; rest "
            f"unchanged {c['rest_unchanged']:.3f} (raw {c['rest_raw_recall_before']:.3f} -> {c['rest_raw_recall']:.3f}, "
            f"chat {c['rest_chat_recall_before']:.3f} -> {c['rest_chat_recall']:.3f})")


def tell(mem: Memory, batch: Sequence[Fact], told: int, seconds: dict[str, float]) -> list[dict]:
    """Inject one batch, adding its seconds to `seconds` (the sleep it set off, if any,
    counted as sleeping); returns that sleep as an event for the plot and the record."""
    t = time.perf_counter()
    res = mem.inject(list(batch))
    spent = time.perf_counter() - t
    slept = res.slept
    asleep = slept.seconds if slept is not None else 0.0
    seconds["inject"] += spent - asleep
    seconds["sleep"] += asleep
    if slept is None or slept.id is None:  # no sleep due, or one with nothing to do
        return []
    return [{"facts": told, "kind": slept.kind, "status": slept.status, "seconds": round(slept.seconds, 1),
             "consolidated": len(slept.consolidated), "kept": len(slept.kept), "reason": slept.reason}]


def checkpoint(mem: Memory, told: Sequence[Fact], base: Baseline, seconds: dict[str, float],
               progress: bool) -> dict[str, Any]:
    """One row of the curve: everything measured on all facts told so far."""
    status = mem.status(measure_perplexity=False)
    return {"facts": len(told), "people": len({f.subject for f in told}), **measure(mem, told, base, progress),
            "memit_facts": status["facts"]["memit"], "consolidated_facts": status["facts"]["consolidated"],
            "cycles": cycle_counts(mem.history()), "inject_seconds": round(seconds["inject"], 1),
            "sleep_seconds": round(seconds["sleep"], 1)}


# --- the new process --------------------------------------------------------------


def recheck(home: Path, facts: Sequence[Fact], base: Baseline, digest: str, model: str | None,
            device: str | None) -> dict[str, Any]:
    """Measure the home again in a fresh Python process, which rebuilds the weights
    from the home alone (the issue's "then a new process")."""
    spec = home.parent / f"{home.name}-recheck.json"
    spec.write_text(json.dumps({"home": str(home), "model": model, "device": device, "digest": digest,
                                "facts": [f.to_dict() for f in facts], "base": base.to_dict()}), encoding="utf-8")
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--recheck", str(spec)],
                              check=False, capture_output=True, text=True)
    finally:
        spec.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the new process failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def recheck_main(spec_path: str) -> None:
    """The new process: open the home, measure, print one JSON line."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    lm = load_model(spec["model"], device=spec["device"], progress=False)
    t = time.perf_counter()
    with Memory(lm, home=spec["home"], config=MemoryConfig(progress=False)) as mem:
        opened = time.perf_counter() - t
        out = measure(mem, [Fact.from_dict(f) for f in spec["facts"]], Baseline.from_dict(spec["base"]), False)
        out |= {"same_weights": lm.weights_digest() == spec["digest"], "open_seconds": round(opened, 1)}
    print(json.dumps(out), flush=True)


# --- over fact sets -----------------------------------------------------------------


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def summary(runs: Sequence[dict]) -> list[dict]:
    """Per checkpoint, each metric's mean, min and max over the fact sets (unrounded)."""
    out = []
    for i, row in enumerate(runs[0]["rows"]):
        entry: dict[str, Any] = {"facts": row["facts"]}
        for m in METRICS:
            xs = [r["rows"][i][m] for r in runs]
            entry[m] = {"mean": mean(xs), "min": min(xs), "max": max(xs)}
        out.append(entry)
    return out


def means(runs: Sequence[dict]) -> list[dict]:
    """Per checkpoint, {"facts": n, metric: mean over the fact sets}."""
    return [{"facts": e["facts"], **{m: e[m]["mean"] for m in METRICS}} for e in summary(runs)]


def restart_means(runs: Sequence[dict]) -> dict[str, Any]:
    """The new process's figures, averaged over the fact sets."""
    return {"facts": runs[0]["rows"][-1]["facts"], **{m: mean([r["restart"][m] for r in runs]) for m in METRICS},
            "same_weights": all(r["restart"]["same_weights"] for r in runs)}


def goals(points: Sequence[dict], where: str = "live") -> list[dict]:
    """Each goal of issue 25 at a checkpoint reached, with its value and whether it is met.
    `points`: {"facts": n, metric: value, ...} per checkpoint (means over fact sets)."""
    at = {p["facts"]: p for p in points}
    out = []
    for metric, n, bound, direction in GOALS:
        if n in at:
            value = at[n][metric]
            met = value >= bound if direction == ">=" else value <= bound
            out.append({"metric": metric, "facts": n, "where": where, "direction": direction, "bound": bound,
                        "value": value, "met": met})
    return out


def assemble(shared: dict[str, Any], runs: list[dict]) -> dict[str, Any]:
    """A whole result from its settings and its fact sets' runs: summary, the new
    process's means, and the goals judged both live and in the new process."""
    again = restart_means(runs)
    changed = [r["changes"] for r in runs if r.get("changes")]
    changes = {k: mean([c[k] for c in changed]) for k in changed[0]} if changed else None
    return {**shared, "seeds": [r["seed"] for r in runs], "summary": summary(runs), "restart": again,
            "changes_mean": changes,
            "goals": goals(means(runs)) + goals([again], "new process"), "runs": runs}


def merge(results: dict[str, dict]) -> dict[str, Any]:
    """One result from results run apart (one process per fact set, say), keyed by where
    each came from. Results of other settings, machines, commits or checkpoints, or
    that repeat a fact set, are refused with a ValueError naming them."""
    ref_name, ref = next(iter(results.items()))
    runs: list[dict] = []
    for name, result in results.items():
        if not isinstance(result, dict) or result.get("benchmark") != "lifelong" or "runs" not in result:
            raise ValueError(f"{name}: not a lifelong result")
        for key in SHARED:
            if result.get(key) != ref.get(key):
                raise ValueError(f"{name}: {key} {result.get(key)!r} differs from {ref_name}'s {ref.get(key)!r}")
        runs += result["runs"]
    stops = {tuple(row["facts"] for row in run["rows"]) for run in runs}
    if len(stops) > 1:
        raise ValueError(f"the runs stop at different checkpoints: {sorted(stops)}")
    seeds = [run["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"a fact set appears twice: seeds {seeds}")
    shared = {key: ref[key] for key in SHARED if key in ref}
    return assemble({**shared, "date": max(str(r.get("date", "")) for r in results.values()),
                     "merged": {name: r.get("command") for name, r in results.items()}}, runs)


# --- reporting ------------------------------------------------------------------------

HEADER = (f"{'facts':>5} {'set':>8} {'raw':>6} {'chat':>6} {'loc':>6} {'chatloc':>7} {'ppl %':>7} "
          f"{'naps':>9} {'deep':>9} {'memit':>5} {'inject s':>9} {'sleep s':>8}")


def slept(cycles: dict[str, int], kind: str) -> str:
    """'3' or '3+1r': accepted, and rejected or failed cycles of one kind."""
    ok = cycles.get(f"{kind} accepted", 0)
    bad = sum(v for k, v in cycles.items() if k.startswith(kind + " ") and not k.endswith(" accepted"))
    return f"{ok}+{bad}r" if bad else str(ok)


def row_line(label: str, row: dict[str, Any]) -> str:
    """One line of the table; counts and seconds where the row has them."""
    num = lambda key, fmt: format(row[key], fmt) if key in row else ""
    cycles = row.get("cycles")
    return (f"{row['facts']:>5} {label:>8} {row['raw_recall']:>6.3f} {row['chat_recall']:>6.3f} "
            f"{row['locality']:>6.3f} {row['chat_locality']:>7.3f} {100 * row['ppl_change']:>+7.2f} "
            f"{'' if cycles is None else slept(cycles, 'nap'):>9} {'' if cycles is None else slept(cycles, 'deep'):>9} "
            f"{num('memit_facts', 'd'):>5} {num('inject_seconds', '.1f'):>9} {num('sleep_seconds', '.1f'):>8}")


def table(result: dict[str, Any]) -> str:
    """Per checkpoint the mean over fact sets, then each set; the new process last."""
    runs = result["runs"]
    lines = [HEADER]
    for i, avg in enumerate(means(runs)):
        if len(runs) > 1:
            lines.append(row_line("mean", avg))
        lines += [row_line(str(r["seed"]), r["rows"][i]) for r in runs]
    if len(runs) > 1:
        lines.append(row_line("new mean", result["restart"]))
    lines += [row_line(f"{r['seed']} new", {"facts": r["rows"][-1]["facts"], **r["restart"]}) for r in runs]
    lines += [change_line(f"{r['seed']} changes", r["changes"]) for r in runs if r.get("changes")]
    same = all(r["restart"]["same_weights"] for r in runs)
    lines.append(f"new process rebuilt bitwise the same weights: {'yes' if same else 'NO'}")
    return "\n".join(lines)


def goal_line(g: dict[str, Any]) -> str:
    """'goal chat_recall at 200 facts (live) >= 0.95: 0.9612 (met)'; perplexity in percent."""
    pct = g["metric"] == "ppl_change"
    show = (lambda x: f"{100 * x:+.3f}%") if pct else (lambda x: f"{x:.4f}")
    return (f"goal {g['metric']} at {g['facts']} facts ({g['where']}) {g['direction']} {show(g['bound'])}: "
            f"{show(g['value'])} ({'met' if g['met'] else 'MISSED'})")


def publish(name: str, result: dict[str, Any]) -> None:
    """Write results/<name>.json and .png; print the table and how the goals fared."""
    save(name, result)
    print(table(result))
    for g in result["goals"]:
        print(goal_line(g))
    if not result["goals"]:
        print("no goal checkpoint (200, 1000 facts) was reached")
    plot(result, RESULTS / f"{name}.png")  # last: a machine without matplotlib still has the table
    print(f"wrote {RESULTS / name}.json and .png", flush=True)


def plot(result: dict[str, Any], path: Path) -> None:
    """Write the lifelong figure (`figure`) as a PNG."""
    import matplotlib.pyplot as plt

    fig = figure(result)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure(result: dict[str, Any]):
    """Recall (raw, chat) and locality against facts told, means over fact sets with
    their range shaded, perplexity change (%) on the right axis, the new process's
    figures at the end, the goals reached (hollow diamonds) and, along the bottom, a
    mark for each nap and deep sleep (one row of marks per fact set)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    n = [row["facts"] for row in runs[0]["rows"]]
    fig, ax = plt.subplots(figsize=(8, 5))
    for m, style, label in (("raw_recall", "o-", "raw recall"), ("chat_recall", "s-", "chat recall"),
                            ("locality", "^-", "locality, raw"), ("chat_locality", "v-", "locality, chat")):
        xs = [[r["rows"][i][m] for r in runs] for i in range(len(n))]
        line, = ax.plot(n, [mean(x) for x in xs], style, label=label)
        if len(runs) > 1:
            ax.fill_between(n, [min(x) for x in xs], [max(x) for x in xs], color=line.get_color(), alpha=0.15)
        ax.plot([n[-1]], [result["restart"][m]], "*", color=line.get_color(), ms=12)
    ax.plot([], [], "k*", ms=10, label="new process")
    reached = result["goals"]
    shares = [(g["facts"], g["bound"]) for g in reached if g["metric"] != "ppl_change" and g["where"] == "live"]
    if shares:
        ax.plot(*zip(*shares), "D", mfc="none", mec="k", ms=9, label="goal: recall, locality")
    sleep_marks(ax, runs)
    ax.set_xscale("log")
    ax.set_xticks(n, [str(x) for x in n])
    ax.minorticks_off()
    ax.set_ylim(-0.02 * (len(runs) + 1), 1.05)
    ax.set_xlabel(f"facts told (batches of {result.get('batch') or 5}, people's facts shuffled over time)")
    ax.set_ylabel("share")
    ax2 = ax.twinx()
    ppl = [100 * mean([r["rows"][i]["ppl_change"] for r in runs]) for i in range(len(n))]
    ax2.plot(n, ppl, "r--", label="perplexity change (%)")
    ax2.plot([n[-1]], [100 * result["restart"]["ppl_change"]], "r*", ms=12)
    for g in reached:
        if g["metric"] == "ppl_change" and g["where"] == "live":
            ax2.plot([g["facts"]], [100 * g["bound"]], "D", mfc="none", mec="r", ms=9, label="goal: perplexity")
    ax2.set_ylim(bottom=min(0.0, *ppl))  # from 0%, so that a small change looks small
    ax2.set_ylabel("perplexity change (%)", color="r")
    fig.legend(loc="lower center", ncol=4, fontsize=7)
    sets = f" (mean of {len(runs)} fact sets, range shaded)" if len(runs) > 1 else ""
    name = Path(result["model"]).name if result.get("model") else "SmolLM2-135M-Instruct"
    ax.set_title(f"Lifelong memory on {name}: facts told through naps and deep sleeps\n"
                 f"marks at the bottom: sleeps, a row per fact set{sets}", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


SLEEP_MARKS = {("nap", True): ("|", "C0", "nap"), ("nap", False): ("x", "C0", "nap rejected"),
               ("deep", True): ("^", "C3", "deep sleep"), ("deep", False): ("x", "C3", "deep sleep rejected")}


def sleep_marks(ax: Any, runs: Sequence[dict]) -> None:
    """A mark at the facts told when each nap or deep sleep happened, a row per fact set."""
    labelled: set[str] = set()
    for j, run in enumerate(runs):
        for kind_ok, (marker, color, label) in SLEEP_MARKS.items():
            xs = [s["facts"] for s in run["sleeps"] if (s["kind"], s["status"] == "accepted") == kind_ok]
            if xs:
                ax.plot(xs, [-0.02 * (j + 0.5)] * len(xs), marker, color=color, ms=6, ls="none",
                        label=None if label in labelled else label)
                labelled.add(label)


# --- the command line ------------------------------------------------------------------


def positive(text: str) -> int:
    """A positive integer option (as capacity.py's `--batch`)."""
    try:
        return batch_size(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None


def checkpoint_list(text: str) -> list[int]:
    """`--checkpoints 40,100,200` → [40, 100, 200]."""
    try:
        points = sorted({positive(x) for x in text.split(",")})
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"checkpoints must be positive integers, got {text!r}") from None
    return points


def git_commit() -> str | None:
    """The commit the benchmark ran at, '+dirty' with uncommitted changes to tracked files."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True, check=True).stdout
        return run("rev-parse", "--short", "HEAD").strip() + ("+dirty" if run("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max", type=positive, default=1000, help="facts to tell (default 1000)")
    sets = ap.add_mutually_exclusive_group()
    sets.add_argument("--sets", type=positive, default=3, help="fact sets, seeds 1..K (default 3)")
    sets.add_argument("--seeds", type=seed_list, help="comma-separated seeds of the fact sets instead")
    ap.add_argument("--batch", type=batch_size, default=5, help="facts per injection (default 5)")
    ap.add_argument("--checkpoints", type=checkpoint_list, default=list(CHECKPOINTS),
                    help="comma-separated facts told at which to measure (default 40,100,200,400,1000,2000); "
                         "--max is always one")
    ap.add_argument("--changes", type=int, default=20,
                    help="facts to update and facts to forget after the last checkpoint (default 20; 0: none)")
    ap.add_argument("--names", choices=["full", "short"], default="full",
                    help="people's names: invented full names (default), or one common first name of one token "
                         f"each (synthetic.SHORT_NAMES: {len(SHORT_NAMES)} people arriving over {SHORT_SPREAD} "
                         "facts' time, so at most 48 facts)")
    ap.add_argument("--model", help="model path or id (default: the default model)")
    ap.add_argument("--device", help="e.g. cuda (default: where the model loads)")
    ap.add_argument("--out", default="lifelong", help="name of the result files in benchmarks/results")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge these results (fact sets run apart) into --out")
    ap.add_argument("--keep", type=Path, metavar="DIR",
                    help="keep the run (one fact set) at each checkpoint in DIR, and resume the one kept there")
    ap.add_argument("--until", type=positive, metavar="N",
                    help="stop after the checkpoint at N facts (with --keep: resume later without it)")
    ap.add_argument("--recheck", help=argparse.SUPPRESS)  # the new process of `recheck`
    return ap


def merge_files(ap: argparse.ArgumentParser, paths: Sequence[str]) -> dict[str, Any]:
    """`--merge`: read the files and merge them, or stop with a usage error naming the problem."""
    loaded = {}
    for path in paths:
        try:
            loaded[path] = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            ap.error(f"--merge: cannot read {path}: {exc}")
    try:
        return merge(loaded)
    except ValueError as exc:
        ap.error(f"--merge: {exc}")


def main() -> None:
    ap = parser()
    args = ap.parse_args()
    if args.recheck:
        recheck_main(args.recheck)
        return
    if args.merge:
        publish(args.out, merge_files(ap, args.merge))
        return
    if not 0 <= 2 * args.changes <= args.max:
        ap.error(f"--changes {args.changes} needs 0 ≤ 2 × changes ≤ --max ({args.max})")
    seeds = args.seeds or list(range(1, args.sets + 1))
    spread = SHORT_SPREAD if args.names == "short" else GENERATOR["spread"]
    people = SHORT_NAMES if args.names == "short" else None

    def facts_of(seed: int) -> list[Fact]:
        return lifelong_facts(args.max, seed, tuple(GENERATOR["attributes"]), spread, people)

    try:
        facts_of(seeds[0])  # too many facts for the names: a usage error before the model loads
    except ValueError as exc:
        ap.error(f"--max {args.max}: {exc}")
    stops = checkpoints_upto(args.checkpoints, args.max)
    if args.keep and len(seeds) != 1:
        ap.error("--keep keeps one fact set: give --seeds K")
    if args.until is not None and args.until not in stops:
        ap.error(f"--until {args.until} is not a checkpoint ({stops})")
    try:
        lm = load_model(args.model, device=args.device, progress=not args.quiet)
    except ModelNotFoundError as exc:
        ap.error(str(exc))
    cfg = MemoryConfig(auto_sleep=True, progress=False, batch_size=args.batch)
    loc = locality_facts()
    runs = []
    t = time.perf_counter()
    for seed in seeds:
        print(f"fact set {seed}: {args.max} facts, checkpoints {stops}\n{HEADER}", flush=True)
        facts = facts_of(seed)
        keep = None
        if args.keep:
            keep = Kept(args.keep, {"seed": seed, "max": args.max, "batch": args.batch, "checkpoints": stops,
                                    **({"names": args.names} if args.names != "full" else {}),
                                    "model": args.model, "config": cfg.to_dict()})
        try:
            run = run_set(lm, seed, facts, cfg, loc, stops, args.batch, args.model, args.device,
                          progress=not args.quiet, changes=args.changes, keep=keep, until=args.until)
        except ValueError as exc:
            ap.error(f"--keep: {exc}")
        if run is None:
            print(f"stopped after {args.until} facts" + (f"; kept in {args.keep}" if args.keep else ""), flush=True)
            return
        runs.append(run)
    shared = {"benchmark": "lifelong", "commit": git_commit(), "model": args.model, "device": str(lm.device),
              "batch": args.batch, "max": args.max, "checkpoints": stops, "changes": args.changes,
              "config": cfg.to_dict(),
              "locality_facts": len(loc), "generator": {**GENERATOR, "spread": spread, "names": args.names},
              "seconds": round(time.perf_counter() - t, 1)}
    publish(args.out, assemble(shared, runs))


if __name__ == "__main__":
    main()
