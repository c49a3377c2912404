"""`python -m sleepwake.demo` (`make demo`): teach the default model four facts it
cannot know, and show what it says before and after.

    python -m sleepwake.demo [--home DIR] [--model M]

Without --home the memory lives in a temporary directory that is removed at the
end. Converted model weights and the covariance statistics are cached (see
SLEEPWAKE_CACHE), so the first run takes longer than the next ones.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from sleepwake.cli.output import fact_text, fmt_float, marks, one_line, short, table
from sleepwake.errors import SleepwakeError
from sleepwake.facts import Fact

FACTS = [
    Fact("Anselm Kreutzer", "lives in", "Lisbon"),
    Fact("Zofia Wróblewska", "works as a", "veterinarian"),
    Fact("Tobias Grünwald", "has a dog named", "Mochi"),
    Fact("Ines Carvalho", "was born in", "Gdynia"),
]

RULE = "─" * 78


def _section(out: Any, title: str) -> None:
    print(f"\n{title}\n{RULE}", file=out, flush=True)


def _show(out: Any, report: Any, signs: tuple[str, str]) -> None:
    ok, bad = signs
    rows = [[ok if r.raw_ok else bad, f"{r.subject} {r.relation}", "→", short(r.raw_completion, 44)]
            for r in report.facts]
    print("  raw completion (greedy)", file=out)
    for line in table(rows):
        print("    " + line, file=out)
    rows = [[ok if r.chat_ok else bad, r.question, "→", short(r.chat_answer, 44)] for r in report.facts]
    print("  chat answer", file=out)
    for line in table(rows):
        print("    " + line, file=out)
    n = report.n
    raw_n = sum(r.raw_ok for r in report.facts)
    chat_n = sum(r.chat_ok for r in report.facts)
    print(f"  raw recall {raw_n}/{n}   chat recall {chat_n}/{n}   perplexity {fmt_float(report.ppl)}",
          file=out, flush=True)


def run(home: Path, model: str | None, out: Any) -> None:
    from sleepwake.memory import Memory

    signs = marks(out)
    t_start = time.perf_counter()
    print(f"sleepwake demo: memory in {home}", file=out)
    print("loading the model (the first run also converts the GGUF file) …", file=out, flush=True)
    t0 = time.perf_counter()
    with Memory(model, home=home, progress=True) as mem:
        t_load = time.perf_counter() - t0
        print(f"model {mem.lm.name}: {mem.lm.arch.n_layers} layers, edits go into layers "
              f"{mem.layers[0]}–{mem.layers[-1]} (loaded in {t_load:.1f} s)", file=out)
        if mem.facts():
            print(f"note: {home} already holds {len(mem.facts())} fact(s); they stay in the weights", file=out)

        _section(out, "Facts to teach (fictional: the model cannot know them)")
        for line in table([[f.subject, "|", f.relation, "|", f.object] for f in FACTS], gap=" "):
            print("  " + line, file=out)

        _section(out, "BEFORE injection")
        before = mem.evaluate(FACTS)
        _show(out, before, signs)

        _section(out, "Injecting")
        t0 = time.perf_counter()
        mem.editor()  # covariance statistics: computed once per model, then cached
        t_cov = time.perf_counter() - t0
        if t_cov > 1.0:
            print(f"  covariance statistics ready in {t_cov:.1f} s (computed once, then cached)", file=out)
        print(f"  writing {len(FACTS)} facts into layers {mem.layers[0]}–{mem.layers[-1]} …", file=out, flush=True)
        t0 = time.perf_counter()
        result = mem.inject(FACTS)
        t_inject = time.perf_counter() - t0
        rows = [[f"#{r.id}", fact_text(r.fact)] for r in result.records]
        rows += [["", fact_text(f) + "  (already known)"] for f in result.skipped]
        for line in table(rows):
            print("  " + line, file=out)
        n = len(result.records)
        print(f"  {n} fact{'s' if n != 1 else ''} injected in {t_inject:.1f} s", file=out, flush=True)

        _section(out, "AFTER injection")
        after = mem.evaluate(FACTS)
        _show(out, after, signs)

    _section(out, "Summary")
    n = len(FACTS)
    summary = [
        ["", "before", "after"],
        ["raw recall", f"{sum(r.raw_ok for r in before.facts)}/{n}", f"{sum(r.raw_ok for r in after.facts)}/{n}"],
        ["chat recall", f"{sum(r.chat_ok for r in before.facts)}/{n}", f"{sum(r.chat_ok for r in after.facts)}/{n}"],
        ["perplexity", fmt_float(before.ppl), fmt_float(after.ppl)],
    ]
    widths = [max(len(r[i]) for r in summary) for i in range(3)]
    for r in summary:
        print(f"  {r[0]:<{widths[0]}}   {r[1]:>{widths[1]}}   {r[2]:>{widths[2]}}", file=out)
    print(f"  injection took {t_inject:.1f} s for {n} facts; the whole demo {time.perf_counter() - t_start:.0f} s",
          file=out, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sleepwake.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", metavar="DIR", help="keep the memory here (default: a temporary directory)")
    parser.add_argument("--model", metavar="M", help="base model (default: SmolLM2-135M-Instruct)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    out = sys.stdout
    try:
        with contextlib.ExitStack() as stack:
            if args.home:
                home = Path(args.home).expanduser()
            else:
                home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sleepwake-demo-")))
            with contextlib.redirect_stdout(sys.stderr):  # library chatter away from the demo's output
                run(home, args.model, out)
        return 0
    except KeyboardInterrupt:
        print("\nsleepwake demo: interrupted", file=sys.stderr)
        return 130
    except (SleepwakeError, OSError) as exc:
        if os.environ.get("SLEEPWAKE_DEBUG"):
            raise
        print(f"sleepwake demo: error: {one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
