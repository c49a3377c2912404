"""Replies to the memory questions `questions.understand` finds, worded around the
model's own answers.

Each object comes from the model: it answers the canonical question of (subject,
relation), the one its chat edit was made with, from its weights. Only the words
around that answer come from here ("Trondheim." -> "You live in Trondheim."), so
the reply reads as an answer to what the user asked, in the second person when they
asked about themselves. The stored objects are never read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from sleepwake.questions import About, Known, Lookup, Who, named_in, stored

MAX_WORDS = 6
"""A longer answer is a sentence of the model's own, kept as it is."""

_YOU = {"is": "are", "was": "were", "has": "have", "does": "do"}
_ES = re.compile(r"(?:s|sh|ch|x|z|o)es$")
_NAMED = re.compile(r"has an? (?P<kind>.+) named")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n")
_LEADING_NAME = re.compile(r"[A-Z][\w'-]*(?:\s+(?:(?:de|la|van|von|der|den|da|di|du|del|le|bin|ibn|al)\s+)*"
                           r"[A-Z][\w'-]*){0,3}(?=[\s,;:]|$)")
_RUN_ON = re.compile(r"\s+[a-z]")  # a lower-case word after a name


def _you(verb: str) -> str:
    """The second-person form of a third-person verb: "lives" -> "live"."""
    if verb in _YOU:
        return _YOU[verb]
    if verb.endswith("ies"):
        return verb[:-3] + "y"
    if _ES.search(verb):
        return verb[:-2]
    return verb[:-1] if verb.endswith("s") and not verb.endswith("ss") else verb


def _possessive(name: str) -> str:
    return "Your" if not name else f"{name}'" if name.endswith("s") else f"{name}'s"


def worded(name: str, relation: str, answer: str) -> str:
    """The model's `answer` to the canonical question of `relation` as a sentence about
    `name` ("" is the user): "Trondheim." -> "You live in Trondheim."."""
    text = answer.strip()
    core = _SENTENCE_END.split(text, maxsplit=1)[0].rstrip(".!").strip()  # the edit taught "object." and stop
    rel = " ".join(relation.split())
    if rel == "is named" and (m := _LEADING_NAME.match(core)) and (
            len(core.split()) > MAX_WORDS or _RUN_ON.match(core, m.end())):
        # A name run on into more words: a nap can lose the taught ".", and a held
        # subject's edit, read where its name is written, bends the next word ("Tom named Anna").
        core = m.group()
    if not core or len(core.split()) > MAX_WORDS:
        return text
    first, _, rest = rel.partition(" ")
    if rel == "is named":
        out = f"{_possessive(name)} name is {core}"
    elif first in ("favorite", "favourite"):
        out = f"{_possessive(name)} {rel} {core}"
    elif (m := _NAMED.fullmatch(rel)) and " and " in core:  # "Ada and Jonas": children, not a child
        kind = m["kind"]
        out = f"{name or 'You'} {'has' if name else 'have'} {'children' if kind == 'child' else kind + 's'} named {core}"
    elif rel == "is aged" and core.isdigit():
        out = f"{name or 'You'} {'is' if name else 'are'} {core} years old"
    elif name:
        out = f"{name} {rel} {core}"
    else:
        out = f"You {' '.join([_you(first), rest]).strip()} {core}"
    return out[0].upper() + out[1:] + "."


def declined(who: Who) -> str:
    """What a question about a known person that nothing stored answers gets, when it is
    not answered by the model with their memories taken out."""
    if who.me:
        return "You haven't told me that about yourself yet."
    return f"I don't know that about {who.name}."


def answers(plan: Lookup | About, ask: Callable[[str], str], known: Known) -> Iterator[str]:
    """The reply to `plan`, a sentence at a time; `ask` is the model's greedy answer to a
    chat question. A question about someone else by name gets the model's answers as
    they are (exactly `Memory.ask`'s to the canonical question)."""
    name = plan.who.name
    asks = plan.asks
    word = plan.who.me or isinstance(plan, About)
    if isinstance(plan, Lookup) and plan.who.kind:  # "my brother": who is that?
        named = ask(known.questions[asks[0][0]][asks[0][1]])
        subject = named_in(named, known)
        asks = stored(known, (subject,), plan.relations) if subject else ()
        if not asks:
            yield f"I don't know that about your {plan.who.kind}."
            return
        name, word = f"your {plan.who.kind} {subject}", True
    if not asks:
        yield "You haven't told me anything about yourself yet." if plan.who.me else f"I know nothing about {name}."
        return
    for i, (subject, relation) in enumerate(asks):
        answer = ask(known.questions[subject][relation])
        yield ("" if i == 0 else " ") + (worded(name, relation, answer) if word else answer)
