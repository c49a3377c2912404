"""Facts as (subject, relation, object) triples, and the text we build from them.

A fact's completion prompt is ``subject + " " + relation`` and its target is
``" " + object`` (paper §3.2). The chat question is the fact's own ``question``
when given, else one generated from the relation.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from sleepwake.errors import FactFileError, InvalidFactError

MAX_FIELD_CHARS = 500

# Questions for common relations. "{s}" is the subject. The first match wins;
# keys are matched against the start of the normalised relation.
_QUESTION_TEMPLATES: list[tuple[str, str]] = [
    ("lives in", "Where does {s} live?"),
    ("lived in", "Where did {s} live?"),
    ("moved to", "Where did {s} move to?"),
    ("was born in the year", "In which year was {s} born?"),
    ("was born on", "When was {s} born?"),
    ("was born in", "Where was {s} born?"),
    ("is from", "Where is {s} from?"),
    ("comes from", "Where does {s} come from?"),
    ("works as", "What does {s} work as?"),
    ("works at", "Where does {s} work?"),
    ("works for", "Who does {s} work for?"),
    ("is employed by", "Who employs {s}?"),
    ("studies at", "Where does {s} study?"),
    ("studies", "What does {s} study?"),
    ("studied at", "Where did {s} study?"),
    ("studied", "What did {s} study?"),
    ("speaks", "What language does {s} speak?"),
    ("plays the", "Which instrument does {s} play?"),
    ("plays", "What does {s} play?"),
    ("drives a", "What car does {s} drive?"),
    ("owns a", "What does {s} own?"),
    ("has a pet", "What pet does {s} have?"),
    ("has a dog named", "What is the name of {s}'s dog?"),
    ("has a cat named", "What is the name of {s}'s cat?"),
    ("is allergic to", "What is {s} allergic to?"),
    ("likes", "What does {s} like?"),
    ("loves", "What does {s} love?"),
    ("dislikes", "What does {s} dislike?"),
    ("hates", "What does {s} hate?"),
    ("is married to", "Who is {s} married to?"),
    ("is the capital of", "{s} is the capital of which country?"),
    ("is located in", "Where is {s} located?"),
    ("was written by", "Who wrote {s}?"),
    ("wrote", "What did {s} write?"),
    ("favorite color is", "What is {s}'s favorite color?"),
    ("favourite color is", "What is {s}'s favourite color?"),
    ("favorite food is", "What is {s}'s favorite food?"),
    ("favourite food is", "What is {s}'s favourite food?"),
    ("'s favorite", "What is {s}'s favorite{rest}?"),
    ("is named", "What is {s}'s name?"),
    ("is aged", "How old is {s}?"),
    ("drives", "What car does {s} drive?"),
    ("owns", "What does {s} own?"),
    *[(f"has {'an' if kind[0] in 'aeiou' else 'a'} {kind} named", f"What is the name of {{s}}'s {kind}?") for kind in (
        "sister", "brother", "mother", "father", "son", "daughter", "child", "partner", "boyfriend", "girlfriend",
        "fiancé", "fiancée", "friend", "best friend", "cousin", "aunt", "uncle", "grandmother", "grandfather",
        "grandson", "granddaughter", "niece", "nephew", "roommate", "colleague", "boss", "neighbour", "neighbor",
        "dog", "cat", "puppy", "kitten", "hamster", "rabbit", "parrot", "bird", "horse", "fish", "turtle", "snake")],
    ("has a", "What does {s} have?"),
    ("has an", "What does {s} have?"),
    *[(f"favorite {thing} is", f"What is {{s}}'s favorite {thing}?") for thing in (
        "band", "book", "movie", "film", "song", "singer", "artist", "author", "actor", "sport", "team", "city",
        "country", "place", "drink", "dish", "dessert", "fruit", "animal", "season", "game", "show", "series",
        "number", "flower", "holiday", "subject", "restaurant")],
    ("is", "What is {s}?"),
]


def _clean(value: Any, name: str, *, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise InvalidFactError(f"fact field '{name}' must be a string, got {type(value).__name__}")
    text = " ".join(value.split())
    bad = next((c for c in text if unicodedata.category(c) in ("Cc", "Cs")), None)
    if bad is not None:  # NUL, ESC, ...: invisible in a listing, and a terminal may act on them
        raise InvalidFactError(f"fact field '{name}' contains the control character U+{ord(bad):04X}")
    if required and not text:
        raise InvalidFactError(f"fact field '{name}' is empty")
    if len(text) > MAX_FIELD_CHARS:
        raise InvalidFactError(
            f"fact field '{name}' is {len(text)} characters long; the limit is {MAX_FIELD_CHARS}"
        )
    return text


@dataclass(frozen=True)
class Fact:
    """One thing the model should know: ``subject relation object``."""

    subject: str
    relation: str
    object: str
    question: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        # Normalise whitespace and validate once, so every later use can trust it.
        object.__setattr__(self, "subject", _clean(self.subject, "subject"))
        object.__setattr__(self, "relation", _clean(self.relation, "relation"))
        object.__setattr__(self, "object", _clean(self.object, "object"))
        object.__setattr__(self, "question", _clean(self.question, "question", required=False))

    @property
    def prompt(self) -> str:
        """The completion prompt, e.g. ``"Anselm Kreutzer lives in"``."""
        return f"{self.subject} {self.relation}"

    @property
    def target(self) -> str:
        """The completion target, with its leading space: ``" Lisbon"``."""
        return f" {self.object}"

    @property
    def sentence(self) -> str:
        return f"{self.subject} {self.relation} {self.object}."

    @property
    def subject_key(self) -> str:
        """Identity of the subject: its facts share one MEMIT edit (subject keys)."""
        return self.subject.casefold()

    @property
    def key(self) -> tuple[str, str]:
        """Identity of the slot this fact fills: a newer fact with the same key replaces it."""
        return (self.subject_key, self.relation.casefold())

    def chat_question(self) -> str:
        """The question a user would ask in chat to get this fact back."""
        return self.question or question_for(self.subject, self.relation)

    def to_dict(self) -> dict[str, str]:
        d = asdict(self)
        if not d["question"]:
            del d["question"]
        return d

    @classmethod
    def from_dict(cls, data: Any) -> "Fact":
        if not isinstance(data, dict):
            raise InvalidFactError(f"a fact must be a JSON object, got {type(data).__name__}")
        missing = [k for k in ("subject", "relation", "object") if k not in data]
        if missing:
            raise InvalidFactError(f"fact is missing field(s): {', '.join(missing)}")
        return cls(data["subject"], data["relation"], data["object"], data.get("question") or "")

    @classmethod
    def parse(cls, text: str) -> "Fact":
        """Parse ``"SUBJECT | RELATION | OBJECT"`` as typed on the command line."""
        if not isinstance(text, str):
            raise InvalidFactError(f"fact must be a string, got {type(text).__name__}")
        parts = [p.strip() for p in text.split("|")]
        if len(parts) != 3:
            raise InvalidFactError(
                f"expected 'SUBJECT | RELATION | OBJECT' (3 parts separated by '|'), got {len(parts)} part(s)"
            )
        return cls(*parts)


def question_for(subject: str, relation: str) -> str:
    """A natural question for ``subject relation ?``; falls back to a fill-in prompt."""
    rel = " ".join(relation.lower().split())
    for prefix, template in _QUESTION_TEMPLATES:
        if rel == prefix or rel.startswith(prefix + " "):
            rest = relation[len(prefix):].rstrip()
            if template.endswith("{s}?") and rest:
                # "is a friend of" -> generic form below reads better
                break
            return template.format(s=subject, rest=rest)
    return f"Complete the sentence: {subject} {relation} ..."


def load_jsonl(path: str | Path) -> list[Fact]:
    """Read facts from a JSONL file: all or nothing.

    Any malformed line raises FactFileError naming the file and line number, so
    that a caller can refuse the whole file before changing anything.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FactFileError(f"cannot read facts file {path}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FactFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    facts: list[Fact] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FactFileError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
        try:
            facts.append(Fact.from_dict(data))
        except InvalidFactError as exc:
            raise FactFileError(f"{path}:{lineno}: {exc}") from exc
    if not facts:
        raise FactFileError(f"{path}: no facts found")
    return facts


def dump_jsonl(facts: Iterable[Fact], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for fact in facts:
            fh.write(json.dumps(fact.to_dict(), ensure_ascii=False) + "\n")


_WORD = re.compile(r"\w+", re.UNICODE)
_LAST_WORD = re.compile(r"\w+$", re.UNICODE)
_NO_SPACES = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")


def runs_on(obj: str, after: str) -> bool:
    """Whether `after`, written right after `obj`, lengthens its last word ("Wielgosz" +
    "lia"), so that the answer no longer `mentions` it. Text after a word in a script
    without spaces, or after punctuation, cannot; a broken UTF-8 piece ("\ufffd") is
    taken for a letter."""
    if not obj[-1:].isalnum() or _NO_SPACES.search(obj[-1:]):
        return False
    return after[:1].isalnum() or after[:1] == "\ufffd"


def mentions(answer: str, obj: str) -> bool:
    """Whether a generated answer contains the object as whole words, ignoring case
    and punctuation ("Lisbon." and "lisbon" count; "Lisbonne" does not)."""
    a = " ".join(_WORD.findall(answer.casefold()))
    o = " ".join(_WORD.findall(obj.casefold()))
    if _NO_SPACES.search(o):  # Chinese/Japanese/Korean: no spaces between words
        return bool(o) and o in a
    return bool(o) and f" {o} " in f" {a} "


def mentions_for_good(answer: str, obj: str) -> bool:
    """`mentions` on the part of a growing answer that more text cannot change (its
    last word may still grow: "Lisbon" → "Lisbonne"), so once true it stays true."""
    if _NO_SPACES.search(obj):  # matched as a substring, which more text cannot undo
        return mentions(answer, obj)
    return mentions(_LAST_WORD.sub("", answer), obj)
