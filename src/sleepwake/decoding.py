"""Token-by-token generation with a KV cache, as chat replies and the server stream it:
greedy by default, or sampled (temperature, top-p) from a generator of the reply's own,
and cut at stop strings.

    reply = Decoding(model, tokenizer, ids, 64, Sampling(temperature=0.8, seed=7, stop=("\\n",)))
    text = "".join(reply)          # then reply.tokens, reply.finish_reason
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sleepwake.errors import InvalidRequestError
from sleepwake.inference import CACHE
from sleepwake.placement import input_device, output_device

MAX_STOPS = 4  # as OpenAI's API
MAX_STOP_CHARS = 200
SEED_RANGE = (-(2**63), 2**63 - 1)  # OpenAI's seed is a 64-bit integer


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 60 else text[:59] + "…"


@dataclass(frozen=True)
class Sampling:
    """How a reply's tokens are chosen, with the ranges of OpenAI's API.

    Temperature 0 (the default) is greedy decoding: the tokens `inference.generate`
    gives. Above 0, tokens are drawn from the softmax at that temperature, within the
    smallest set of tokens whose probability reaches `top_p`. A `seed` makes a sampled
    reply reproducible; without one each reply draws a fresh seed. The global random
    state is neither read nor moved. A reply ends before the first of its `stop`
    strings (which is not part of it)."""

    temperature: float = 0.0
    top_p: float = 1.0
    stop: str | Sequence[str] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if not _number(self.temperature) or not 0 <= self.temperature <= 2:
            raise InvalidRequestError(f"temperature must be a number from 0 to 2, got {self.temperature!r}")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be a number greater than 0 and at most 1, got {self.top_p!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, Sequence) or len(stop) > MAX_STOPS or not all(
                isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
            raise InvalidRequestError(f"stop must be a string or a list of at most {MAX_STOPS} strings of 1 to "
                                      f"{MAX_STOP_CHARS} characters, got {_short(self.stop)}")
        object.__setattr__(self, "stop", tuple(stop))
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise InvalidRequestError(f"seed must be a 64-bit integer, got {_short(self.seed)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


class Decoding:
    """A reply being generated from the prompt `ids`, at most `max_new_tokens` tokens.

    Iterating yields its text as it becomes printable: a piece that ends inside a
    multi-byte character, or that may be the start of a stop string, waits for the next
    token. Afterwards `tokens` is the number of tokens generated and `finish_reason`
    why it ended: "stop" (the end of the turn, or a stop string) or "length". `model` is a
    PyTorch model, or another backend's with a `stream(ids, sampling)` of token ids
    (`sleepwake.mlx.model.MlxModel`)."""

    def __init__(self, model: Any, tokenizer: Any, ids: Sequence[int], max_new_tokens: int,
                 sampling: Sampling = GREEDY) -> None:
        self.model, self.tokenizer, self.ids = model, tokenizer, list(ids)
        self.max_new_tokens, self.sampling = max_new_tokens, sampling
        self.tokens = 0
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[str]:
        return self._run()

    def _run(self) -> Iterator[str]:
        tokenizer, stops = self.tokenizer, self.sampling.stop
        steps = self._tokens() if isinstance(self.model, nn.Module) else self.model.stream(self.ids, self.sampling)
        out_ids, text, shown = [], "", 0
        self.finish_reason = "length"
        for _ in range(self.max_new_tokens):
            nxt = next(steps, None)
            if nxt is None:  # the end of the turn
                self.finish_reason = "stop"
                break
            self.tokens += 1
            out_ids.append(nxt)
            decoded = tokenizer.decode(out_ids, skip_special_tokens=True)
            if decoded.endswith("\ufffd"):  # inside a multi-byte character
                continue
            text = decoded
            cut = first_stop(text, stops)
            if cut is not None:
                if cut > shown:
                    yield text[shown:cut]
                self.finish_reason = "stop"
                return
            ready = len(text) - stop_prefix(text, stops)
            if ready > shown:
                yield text[shown:ready]
                shown = ready
        if len(text) > shown:  # held back for a stop string that never came
            yield text[shown:]

    @torch.no_grad()
    def _tokens(self) -> Iterator[int]:
        """The reply's tokens on a PyTorch model, until it ends the turn."""
        model = self.model
        device = input_device(model)
        generator = None
        if not self.sampling.greedy:  # where the logits are drawn from
            generator = torch.Generator(device=output_device(model))
            if self.sampling.seed is None:
                generator.seed()
            else:
                generator.manual_seed(self.sampling.seed % 2**64)
        end = model.generation_config.eos_token_id
        end = set(end if isinstance(end, list) else [end]) | {self.tokenizer.eos_token_id}
        end.discard(None)
        x = torch.tensor([self.ids], device=device)
        cache = None
        while True:
            out = model(input_ids=x, use_cache=True, **{CACHE: cache})
            cache = getattr(out, CACHE)
            nxt = self._choose(out.logits[0, -1], generator)
            if nxt in end:
                return
            yield nxt
            x = torch.tensor([[nxt]], device=device)

    def _choose(self, logits: torch.Tensor, generator: torch.Generator | None) -> int:
        s = self.sampling
        if generator is None:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / s.temperature, dim=-1)
        if s.top_p < 1:  # the most likely tokens, until their probability reaches top_p
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < s.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=generator))


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop string in `text` begins, or None."""
    return min((i for s in stops if (i := text.find(s)) >= 0), default=None)


def stop_prefix(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of `text` that a stop string starts with: held
    back until the next piece says whether the stop string comes."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
