"""Helpers shared by the benchmark scripts: machine description and result files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def known_facts(lm, facts: list) -> list:
    """The facts this model completes right (greedy raw completion names the object) as it is now:
    the real-world facts a locality figure then checks it still completes."""
    from sleepwake.evaluate import raw_completions, recall

    return [f for f, a in zip(facts, raw_completions(lm.model, lm.tokenizer, facts)) if recall([a], [f])]


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads (torch {torch.__version__})"


def save(name: str, data: dict) -> Path:
    """Write results/<name>.json with the command, machine and date, and print it."""
    RESULTS.mkdir(exist_ok=True)
    record = {
        "command": "python " + " ".join(sys.argv),
        "machine": machine(),
        "date": _dt.date.today().isoformat(),
        **data,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=2, ensure_ascii=False))
    return path
