"""Prompt formatting and greedy generation, shared by editing and evaluation.

MEMIT keys depend on the exact tokens of a prompt, so the chat prompt we edit with
must be byte-for-byte the one `ask` sends: both come from `chat_text` here.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Sequence

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.modeling_outputs import BaseModelOutputWithPast

from sleepwake.facts import Fact, mentions_for_good
from sleepwake.placement import input_device


CACHE = "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"
"""The name of a forward pass's KV cache, as argument and output field: transformers
renamed `past_key_values` to `cache`, and warns on every call that uses the old name."""


def shared_prefix(model: nn.Module, seqs: Sequence[Sequence[int]], limit: int, min_len: int = 8
                  ) -> tuple[int, dict[str, Any]]:
    """The first tokens every one of `seqs` shares (at most `limit`), run once: their count
    and the forward argument that carries them (their KV cache, one copy per sequence).

    A chat template's system turn is most of a short chat question; batched rows then
    run only what follows it. (0, {}) where fewer than `min_len` tokens are shared."""
    first, shared = seqs[0], limit
    for ids in seqs[1:]:
        shared = next((k for k in range(shared) if ids[k] != first[k]), shared)
    if shared < min_len:
        return 0, {}
    prefix = torch.tensor([list(first[:shared])], device=input_device(model))
    cache = getattr(model.get_decoder()(input_ids=prefix, use_cache=True), CACHE)
    cache.batch_repeat_interleave(len(seqs))
    return shared, {CACHE: cache}


def rows_per_pass(device: torch.device) -> int:
    """Sequences per no-grad pass when many short prompts are read at once (fact checks,
    key reads). On a GPU, 32 rows leave it idle between passes: over 10,000 held facts on
    the 8B shape (H100), 256 rows took the check from 38.8 s to 31.1 s and the key read
    from 36.4 s to 25.3 s. A CPU gains nothing past a few dozen, and pads more."""
    return 256 if device.type == "cuda" else 32


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on chosen hidden states only: over every position of every
    sequence it would cost more than the rest of the model on small models."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma 2/3
        logits = torch.tanh(logits / cap) * cap
    return logits


def chat_text(tokenizer: Any, question: str) -> str:
    """The model's chat template around one user turn, ready for the answer."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    # Base models without a template: a plain Q/A frame.
    return f"Question: {question}\nAnswer:"


def with_stop(text: str) -> str:
    """Text ending in a full stop: teaching the model where an object ends keeps it
    from running on into a longer word ("Plovdivós")."""
    return text if text.rstrip()[-1:] in ".!?…。" else text + "."


def chat_answer(tokenizer: Any, text: str) -> str:
    """An assistant answer as trained into the model: with a full stop, and ending the
    turn (so that `ask` stops right after it) where the model has a chat template."""
    end = tokenizer.eos_token if getattr(tokenizer, "chat_template", None) and tokenizer.eos_token else ""
    return with_stop(text) + end


def lead_in(tokenizer: Any, text: str, subject: str) -> str:
    """Raw `text` that opens with `subject`, after a line break where its first token would
    be the whole subject. A model that adds no start token (SmolLM2) reads the first token
    of every text nearly alike (its attention sink): an edit keyed there fires on every
    text ("Bob | works as | a pilot" took perplexity from 22.9 to 20,463). Subjects of
    several tokens ("Lukas", "Anselm Kreutzer") end past it, where their key is their own,
    and are left as they are."""
    if not subject or not text.startswith(subject) or text[len(subject):len(subject) + 1].isalnum():
        return text
    spans = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
    return "\n" + text if spans and spans[0][1] >= len(subject) else text


def raw_prompt(tokenizer: Any, fact: Fact) -> str:
    """`fact`'s completion prompt as every part of the memory writes and reads it (`lead_in`)."""
    return lead_in(tokenizer, fact.prompt, fact.subject)


def encode(tokenizer: Any, text: str, *, chat: bool = False) -> list[int]:
    """Token ids as the model sees them; a chat text already holds its special tokens."""
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def encode_target(tokenizer: Any, prompt: str, target: str, *, chat: bool = False) -> list[int]:
    """Ids of `target` as they follow `prompt` (tokenising jointly keeps BPE merges honest)."""
    p = encode(tokenizer, prompt, chat=chat)
    full = encode(tokenizer, prompt + target, chat=chat)
    if full[: len(p)] == p and len(full) > len(p):
        return full[len(p):]
    return list(tokenizer(target, add_special_tokens=False)["input_ids"])


def attention_kernels(device: torch.device) -> contextlib.AbstractContextManager:
    """On CUDA: scaled-dot-product attention without its cuDNN backend.

    cuDNN builds an execution plan for every new input shape, and editing and
    generation meet a new shape at almost every call: on the 8B shape, 5-fact
    injections that met one took 3-4 s instead of ~0.9 s (BENCHMARKS.md). Flash and
    memory-efficient attention need no such step."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


class _UntilMentioned(StoppingCriteria):
    """Ends a row once its text so far mentions its expected object for good."""

    def __init__(self, tokenizer: Any, start: int, objects: Sequence[str]) -> None:
        self.tokenizer, self.start, self.objects = tokenizer, start, objects

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        done = [mentions_for_good(t, o) for t, o in zip(texts, self.objects)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    until: Sequence[str] | None = None,
) -> list[str]:
    """Greedy continuations of already-encoded prompts, decoded without special tokens.

    `until` (one expected object per prompt, for recall checks) ends a row as soon as
    it mentions its object for good: the check's result is the same as on the whole
    continuation, and a model that knows its facts is measured several times faster.
    """
    device = input_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        n = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), n), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        for i, p in enumerate(chunk):  # left padding: every row ends where generation starts
            ids[i, n - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, n - len(p):] = 1
        stop = None
        if until is not None:
            stop = StoppingCriteriaList([_UntilMentioned(tokenizer, n, until[start : start + batch_size])])
        with attention_kernels(device):
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                stopping_criteria=stop,
            )
        for row in gen[:, n:]:
            out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out
