"""Why the keyed memory checks a first-name key (issue 25): cosines at the first MEMIT
layer's down-projection input, for invented people in four contexts each (raw prompt,
chat question, mid-sentence, another chat question), against a subject's stored keys
(its raw prompt and chat question), at the subject's last token and at the last token
of its other words (the first name). Categories: the subject itself, a stranger with
the same surname, one with the same first name, someone else.

    python benchmarks/keyed_heads.py [--people 12] [--seed 3]

Prints min / median / max per category and writes results/keyed-heads.json.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from common import save

from sleepwake.inference import chat_text, encode, pad_right
from sleepwake.memit.requests import head_token_of, last_token_of
from sleepwake.memit.trace import run_capture
from sleepwake.models import load_model
from sleepwake.synthetic import fictional_people

LAYER = 4  # the default model's first MEMIT layer, where the keyed memory matches


def contexts(tok, name: str) -> list[tuple[str, bool]]:
    return [(f"{name} lives in", False), (chat_text(tok, f"Where does {name} live?"), True),
            (f"Yesterday I met {name} at the market.", False), (chat_text(tok, f"What does {name} do for a living?"), True)]


def keys(lm, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(last-token key, first-name key) of `name` in each context."""
    out = []
    for text, chat in contexts(lm.tokenizer, name):
        ids = encode(lm.tokenizer, text, chat=chat)
        last = last_token_of(lm.tokenizer, text, name, chat=chat)
        head = head_token_of(lm.tokenizer, text, name, chat=chat)
        captured, _ = run_capture(lm.model, lm.arch, pad_right([ids], 0, lm.device), key_layers=(LAYER,))
        out.append((captured[LAYER][0, last].float(), captured[LAYER][0, head].float()))
    return out


def nearest(key: tuple[torch.Tensor, torch.Tensor], stored: list[tuple[torch.Tensor, torch.Tensor]]
            ) -> tuple[float, float]:
    """The highest cosine to a stored key, at the last token and at the first name."""
    return tuple(max(float(F.cosine_similarity(key[i], s[i], dim=0)) for s in stored) for i in (0, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--people", type=int, default=12)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    lm = load_model(progress=False)
    people = fictional_people(5 * args.people, args.seed)
    n = len(people)
    firsts, lasts = [p.split()[0] for p in people], [p.split()[-1] for p in people]
    rows: dict[str, list[tuple[float, float]]] = {"own": [], "same surname": [], "same first name": [], "other": []}
    for i in range(args.people):
        own = keys(lm, people[i])
        stored = own[:2]  # what a sleep keys: the raw prompt and the chat question
        rows["own"] += [nearest(k, stored) for k in own[2:]]
        for kind, name in (("same surname", f"{firsts[(i + 7) % n]} {lasts[i]}"),
                           ("same first name", f"{firsts[i]} {lasts[(i + 11) % n]}"),
                           ("other", people[(i + 23) % n])):
            rows[kind] += [nearest(k, stored) for k in keys(lm, name)]
    out = {}
    for kind, xs in rows.items():
        last, head = [x[0] for x in xs], [x[1] for x in xs]
        out[kind] = {part: {"min": min(v), "median": statistics.median(v), "max": max(v)}
                     for part, v in (("last token", last), ("first name", head))}
        print(f"{kind:16s} last token {min(last):.3f} / {statistics.median(last):.3f} / {max(last):.3f}   "
              f"first name {min(head):.3f} / {statistics.median(head):.3f} / {max(head):.3f}")
    save("keyed-heads", {"people": args.people, "seed": args.seed, "layer": LAYER, "cosines": out})


if __name__ == "__main__":
    main()
