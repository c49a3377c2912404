"""What a user's question asks the memory: who it is about, and which stored relation.

MEMIT reads a fact where its subject's name is in the prompt, and the chat edit was
made with one question per (subject, relation) (`Fact.chat_question`). "Where do I
live?" names nobody, and "Where's home for Ottilie?" is not the question the edit
knows, so the model answers neither from its weights. `understand` turns such a
question into a plan over the memory's own canonical questions: first person ("I",
"me", "my") is the user's subject as extraction writes it (`ConversationState.subject`,
also "the user" for what was told before the name), relatives named in passing ("my
brother Lukas") are themselves, an unnamed one ("my brother") is found through the
owner's fact that names them, and a question about a known person that no stored
relation answers is marked `Unknown`, so that the person's edit cannot take it over.

Only which subjects and relations exist is read from the memory (`Known`), never an
object: the answers come from the model's weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from sleepwake.extract import _KIND_NAMES, _PETS, _RELATIVES
from sleepwake.facts import Fact

USER = "the user"
"""The subject of what the user said before telling their name (`ConversationState.default_subject`)."""


@dataclass(frozen=True)
class Known:
    """The memory without its objects: each subject's relations and the chat question
    each was edited with, in the order they were stored."""

    questions: dict[str, dict[str, str]]  # subject -> {relation: question}

    @classmethod
    def of(cls, facts: Iterable[Fact]) -> "Known":
        out: dict[str, dict[str, str]] = {}
        for f in facts:
            out.setdefault(f.subject, {})[f.relation] = f.chat_question()
        return cls(out)

    def relation(self, subject: str, relation: str) -> str | None:
        """The stored spelling of `relation` for `subject` (matched ignoring case)."""
        rel = relation.casefold()
        return next((r for r in self.questions.get(subject, {}) if r.casefold() == rel), None)


@dataclass(frozen=True)
class Who:
    """The person a question is about."""

    subjects: tuple[str, ...]  # the stored subjects that are this person, preferred first
    me: bool = False
    kind: str | None = None  # "my brother" unnamed: the person the owner's "has a brother named" fact names
    name: str = ""  # as a reply names them ("Lukas"); "" for the user


@dataclass(frozen=True)
class Lookup:
    """Ask the canonical question of each (subject, relation) in `asks`; with `who.kind`,
    first find who that relative is (`relations` are then the ones wanted of them)."""

    who: Who
    asks: tuple[tuple[str, str], ...]
    relations: tuple[str, ...] = ()


@dataclass(frozen=True)
class About:
    """Everything stored about a person: `asks` as in `Lookup`."""

    who: Who
    asks: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Unknown:
    """A question about known people that nothing stored answers: their edits must not
    answer it. `relation` is what it asks, where understood."""

    who: Who
    masked: tuple[str, ...]  # the stored subjects the question names
    relation: str | None = None


Plan = Lookup | About | Unknown


# ---------------------------------------------------------------- relations asked

_KINDS = rf"{_RELATIVES}|{'|'.join(sorted(_PETS))}"
_PLURAL_KINDS = {"kids": "child", "children": "child", "sons": "son", "daughters": "daughter", "brothers": "brother",
                 "sisters": "sister", "cousins": "cousin", "friends": "friend", "best friends": "best friend"}
_FAMILIES = {
    "siblings": ("brother", "sister", "twin brother", "twin sister", "twin"),
    "sibling": ("brother", "sister", "twin brother", "twin sister", "twin"),
    "children": ("child", "son", "daughter"),
    "kids": ("child", "son", "daughter"),
    "parents": ("mother", "father"),
    "family": ("mother", "father", "brother", "sister", "child", "son", "daughter"),
}


def _has_named(kind: str) -> str:
    return f"has {'an' if kind[0] in 'aeiou' else 'a'} {kind} named"


_SPOUSE = ("is married to", "has a partner named", "has a boyfriend named", "has a girlfriend named",
           "has a wife named", "has a husband named")
_PET_RELATIONS = ("has a pet", *(_has_named(p) for p in sorted(_PETS)))

_W = r"(?:what|which)"
_P = "P"


def _kind(word: str) -> str:
    word = word.strip()
    word = _PLURAL_KINDS.get(word, word)
    return " ".join(_KIND_NAMES.get(w, w) for w in word.split())


def _named(kind: str) -> tuple[str, ...]:
    """Relations that name a person or pet of this kind ("mom" -> "has a mother named")."""
    if kind in _FAMILIES:
        return tuple(_has_named(k) for k in _FAMILIES[kind])
    kind = _kind(kind)
    if kind in ("wife", "husband", "spouse", "partner"):
        return _SPOUSE
    if kind in ("pet", "pets", "animal", "animals"):
        return _PET_RELATIONS
    return (_has_named(kind),)


_K = rf"(?P<kind>{_KINDS}|{'|'.join(_PLURAL_KINDS)}|{'|'.join(_FAMILIES)}|pets?|animals?)"

# (relations wanted, best first, or None for "named by the kind captured", patterns)
# over the normalised question (`_normalise`): the person is "P", "P's" their possessive.
_ASKS: list[tuple[tuple[str, ...] | None, list[str]]] = [
    (None, [rf"what is P's {_K}(?:'s|') names?", rf"what is the names? of P's {_K}", rf"what is P's {_K} (?:called|named)",
            rf"who is P's {_K}", rf"what is P's {_K}",
            rf"does P has (?:an? |any |one )?{_K}", rf"how many {_K} does P has",
            rf"{_W} (?:kind of |sort of |type of )?{_K} does P has"]),
    (("is married to",), [r"who is P married to", r"is P married", r"who did P marry"]),
    (("lives in",), [r"where does P (?:live|stay|reside)", r"where is P (?:based|living|staying|located|residing)",
                     r"where is P's (?:home|place|house|flat|apartment)", r"where is home for P",
                     rf"{_W} (?:city|town|country|place) does P live in", rf"in {_W} (?:city|town|country) does P live",
                     rf"{_W} (?:city|town|country) is P (?:living|based|staying) in",
                     r"where (?:did|has) P (?:move|moved|relocate|relocated)(?: to)?",
                     r"what is P's (?:city|address|location)", r"where P (?:lives?|is based)"]),
    (("lived in",), [r"where did P (?:use to |used to )?live(?: before| previously| earlier| in the past)?",
                     r"where P used to live", r"where was P living before", r"where did P move from",
                     rf"{_W} (?:city|town|country) did P (?:use to )?live in(?: before)?"]),
    (("was born in the year",), [rf"(?:in )?{_W} year was P born(?: in)?", r"what is P's (?:birth year|year of birth)"]),
    (("was born in",), [r"where was P born", r"what is P's (?:birthplace|place of birth)",
                        rf"(?:in )?{_W} (?:city|town|country|place) was P born(?: in)?"]),
    (("was born on",), [r"when was P born", r"(?:what|when) is P's (?:birthday|date of birth|birth date)"]),
    (("is from", "was born in"), [r"where is P (?:originally )?from", r"where does P (?:originally )?come from",
                                  rf"{_W} country is P from", r"what is P's (?:nationality|home country|hometown)"]),
    (("is aged",), [r"how old is P", r"what is P's age", r"what age is P"]),
    (("is named",), [r"what is P's (?:full |first )?name", r"what is P called", r"what does P call P"]),
    (("works as", "works at"), [r"what does P do(?: for (?:a living|work|a job|money)| professionally)?",
            r"what is P's (?:job|occupation|profession|line of work|work|career|trade|role|job title)",
            r"what (?:kind of |sort of |type of )?(?:work|job) does P (?:do|has)", r"what does P work as",
            r"how does P (?:earn|make) (?:a living|money)", r"what P do for (?:a living|work)"]),
    (("works at", "works as"), [r"where does P work", r"who does P work for", rf"{_W} company does P work (?:for|at)",
                                r"who employs P", r"where is P employed", r"what is P's (?:employer|company|workplace)"]),
    (("studies", "studies at", "studied"), [r"what does P study", r"what is P (?:studying|learning)",
                                            rf"{_W} (?:language|subject)s? is P (?:studying|learning)",
                                            r"what is P's (?:major|subject)"]),
    (("studies at", "studied at"), [r"where does P study", rf"{_W} (?:school|university|college) does P (?:go to|attend)"]),
    (("studied", "studied at"), [r"what did P study", r"where did P study"]),
    (("speaks",), [rf"{_W} languages? does P speak", rf"{_W} languages? can P speak",
                   r"does P speak any (?:other |foreign )?languages?", r"how many languages does P speak",
                   r"what is P's (?:native|first|mother) (?:language|tongue)"]),
    (("is allergic to",), [r"what is P allergic to", r"is P allergic to .+",
                           r"does P has (?:any |an )?allerg(?:y|ies)(?: to .*)?", r"what is P's allergies",
                           rf"{_W} allergies does P has", r"what allergies does P has"]),
    (("drives", "owns"), [r"what (?:kind of |sort of |type of )?car does P (?:drive|has|own)", r"what does P drive",
                          r"what is P's car", r"does P has a car", r"does P drive"]),
    (("owns",), [r"what does P own"]),
    (("plays the", "plays"), [rf"{_W} (?:musical )?instruments? does P play", r"does P play (?:any |an )?(?:musical )?"
                              r"instruments?", r"what does P play"]),
    (("plays",), [rf"{_W} (?:sports?|games?) does P play", r"does P play any (?:sports?|games?)"]),
    (("likes", "loves"), [r"what does P (?:like|enjoy|love)", r"what is P into", r"what is P's hobbies",
                          r"what is P's hobby"]),
    (("dislikes", "hates"), [r"what does P (?:dislike|hate)", r"what does P not like"]),
]
_FAVORITE = [r"what is P's favorite (?P<thing>[a-z]+(?: [a-z]+)?)", r"what is P's fave (?P<thing>[a-z]+)",
             rf"{_W} (?P<thing>[a-z]+) does P like (?:the )?(?:best|most)", r"does P has a favorite (?P<thing>[a-z]+)"]
_ABOUT = [r"(?:everything|anything|all|what)(?: else)?(?: do| does| can)? you (?:know|remember|tell P|has(?: stored| noted)?)"
          r" about P", r"(?:everything|anything|all) (?:about P|you know about P)", r"about P", r"who is P",
          r"describe P", r"what has P told you(?: about P)?", r"what did P tell you(?: about P)?"]

_COMPILED = [(rels, [re.compile(p) for p in pats]) for rels, pats in _ASKS]
_FAVORITE_RE = [re.compile(p) for p in _FAVORITE]
_ABOUT_RE = [re.compile(p) for p in _ABOUT]


def _relations(q: str) -> tuple[str, ...] | None:
    """The relations a normalised question asks for, best first; None if not understood."""
    for pattern in _FAVORITE_RE:
        if m := pattern.fullmatch(q):
            return (f"favorite {_kind(m['thing'])} is",)
    for rels, patterns in _COMPILED:
        for pattern in patterns:
            if m := pattern.fullmatch(q):
                return rels if rels is not None else _named(m["kind"])
    return None


# ---------------------------------------------------------------- normalising

_GREETING = re.compile(
    r"^(?:(?:hey|hi|hello|ok|okay|so|and|but|um|also|btw|by the way|please|sorry|quick question|one more thing|"
    r"out of curiosity)\b[,!:]?\s*)*", re.IGNORECASE)
_ASKING = re.compile(
    _GREETING.pattern + r"(?:(?:can|could|would|will) you\s+(?:please\s+)?|please\s+)?"
    r"(?:(?:tell|remind|show) me(?: again)?|do you (?:know|remember|recall)|i (?:forgot|forget|wonder|was wondering)"
    r"|i (?:want|would like|'d like) to know|any idea|remember)?\s*[,:]?\s*")
_FILLER = re.compile(r"\b(?:actually|exactly|again|currently|now|still|really|even|these days|nowadays|"
                     r"at the moment|right now|please|by the way)\b")
_CONTRACTIONS = [(re.compile(p), r) for p, r in [
    (r"\b(what|where|who|how|when|which|that|it|there)'s\b", r"\1 is"), (r"\b(what|where|who|how|when)s\b", r"\1 is"),
    (r"\b(what|where|who|how)'re\b", r"\1 are"), (r"\bi'm\b", "i am"), (r"\bi've\b", "i have"),
    (r"\bi'd\b", "i would"), (r"\bdon't\b", "do not"), (r"\bdoesn't\b", "does not"), (r"\bcan't\b", "cannot"),
    (r"\bdidn't\b", "did not"), (r"\bfavourite\b", "favorite"), (r"\bcolour\b", "color"),
]]
_FIRST = [(re.compile(p), r) for p, r in [
    (r"\b(?:my|mine)\b", "P's"), (r"\b(?:i|me|myself)\b", _P)]]
_AGREE = [(re.compile(p), r) for p, r in [  # "P" is the subject: "do I have" -> "does P has"
    (r"\b(?:am|are)\b", "is"), (r"\bdo(?= P\b)", "does"), (r"\bhave\b", "has"), (r"\bwere\b", "was"),
    (r"\bhas got\b", "has")]]
_EMBEDDED = re.compile(r"^(what|where|who|when|how old|which \w+) (.+) is$")  # "(tell me) what my job is"
_QUESTION_WORD = re.compile(
    r"^(?:where|what|who|whom|whose|how|when|why|which|do|does|did|can|could|would|will|is|are|am|was|were|"
    r"have|has|tell|remind|describe|any idea)\b", re.IGNORECASE)
_SENTENCES = re.compile(r"(?<=[.!?])\s+")
_RELATIVE_BEFORE = re.compile(rf"P's\s+(?:(?:older|younger|elder|big|little|best|twin)\s+)?(?:{_KINDS})"
                              r",?\s+$")
_POSSESSED_KIND = re.compile(rf"P's (?:(?:older|younger|elder|big|little)\s+)?(?P<kind>{_KINDS})\b(?!'s)")


def asked(message: str) -> str | None:
    """The question a message ends with ("Hi! Where do I live?" -> "Where do I live?"),
    or None if its last sentence asks nothing."""
    parts = [p.strip() for p in _SENTENCES.split(" ".join(message.replace("’", "'").split())) if p.strip()]
    if not parts:
        return None
    last = parts[-1]
    return last if last.endswith("?") or _QUESTION_WORD.match(_GREETING.sub("", last, count=1)) else None


def _normalise(text: str) -> str:
    q = text.replace("’", "'").lower().strip(" ?!.")
    q = _ASKING.sub("", q, count=1)
    for pattern, repl in _CONTRACTIONS:
        q = pattern.sub(repl, q)
    return q


def _first_person(q: str) -> str:
    for pattern, repl in _FIRST:
        q = pattern.sub(repl, q)
    return q


def _agree(q: str) -> str:
    for pattern, repl in _AGREE:
        q = pattern.sub(repl, q)
    q = " ".join(_FILLER.sub("", q).replace(" ,", ",").split()).strip(" ,")
    return _EMBEDDED.sub(r"\1 is \2", q)


def _mentions(q: str, original: str, subjects: Iterable[str]) -> list[tuple[int, int, str]]:
    """Spans of `q` (normalised, lower case) that name a stored subject, longest first, not
    overlapping: the whole name, or one word of a longer name written capitalised in the
    question ("Ottilie" for Ottilie Branstrom) where no other subject has that word."""
    names = [s for s in subjects if s.casefold() != USER]
    owners: dict[str, set[str]] = {}
    for s in names:
        if len(s.split()) > 1:
            for w in s.split():
                owners.setdefault(w, set()).add(s)
    candidates = [(s.casefold(), s) for s in names]
    candidates += [(w.casefold(), next(iter(ss))) for w, ss in owners.items()
                   if len(ss) == 1 and len(w) > 2 and w[:1].isupper()
                   and re.search(rf"(?<!\w){re.escape(w)}(?!\w)", original)]
    found: list[tuple[int, int, str]] = []
    for text, subject in sorted(candidates, key=lambda c: -len(c[0])):
        for m in re.finditer(rf"(?<!\w){re.escape(text)}(?!\w)", q):
            if all(m.end() <= a or m.start() >= b for a, b, _ in found):
                found.append((m.start(), m.end(), subject))
    return sorted(found)


def stored(known: Known, subjects: Iterable[str], relations: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """(subject, stored relation) for each wanted relation some subject has, the first subject first."""
    out = []
    for rel in relations:
        for s in subjects:
            if (r := known.relation(s, rel)) is not None:
                out.append((s, r))
                break
    return tuple(out)


def named_in(text: str, known: Known) -> str | None:
    """The stored subject an answer names ("Lukas." -> "Lukas"), if any: the person an
    unnamed relative ("my brother") is, as the model says."""
    spans = _mentions(" ".join(text.casefold().split()), text, known.questions)
    return spans[0][2] if spans else None


def _everything(known: Known, subjects: Iterable[str]) -> tuple[tuple[str, str], ...]:
    seen: set[str] = set()
    out = []
    for s in subjects:
        for r in known.questions.get(s, {}):
            if r.casefold() not in seen:
                seen.add(r.casefold())
                out.append((s, r))
    return tuple(out)


def understand(message: str, known: Known, me: str) -> Plan | None:
    """The plan for answering `message` from the memory, or None where it is no question
    about the user or a known person (then the model answers it as it is).

    `me` is who "I" is (`ConversationState.subject`); facts told before the name was
    known are under "the user" and count as the user's too."""
    question = asked(message)
    if question is None:
        return None
    mine = (me,) if me == USER else (me, USER)
    q = _normalise(question)
    spans = _mentions(q, question, known.questions)
    named = tuple(dict.fromkeys(s for _, _, s in spans))
    if len(named) > 1:
        return Unknown(Who(named, name=named[0]), named)
    if spans:
        start, end, subject = spans[0]
        before = q[:start]
        if rel := _RELATIVE_BEFORE.search(_first_person(before)):  # "my brother Lukas": Lukas
            before = _first_person(before)[:rel.start()]
        q = before + _P + q[end:]
        who = Who((subject,), name=subject)
    else:
        who = Who(mine, me=True)
    q = _agree(_first_person(q))
    if _P not in q:
        return None
    plan = _plan(q, who, known, mine)
    if plan is None and named:
        return Unknown(who, named)
    return plan


def _plan(q: str, who: Who, known: Known, mine: tuple[str, ...]) -> Plan | None:
    if any(p.fullmatch(q) for p in _ABOUT_RE):
        return About(who, _everything(known, who.subjects))
    wanted = _relations(q)
    if wanted is None and who.me and (m := _POSSESSED_KIND.search(q)):
        # "where does my brother live": the brother is whoever the user's fact names
        kind = _kind(m["kind"])
        unnamed = [s for s in (f"{x}'s {kind}" for x in mine) if s in known.questions]
        rest = q[:m.start()] + _P + q[m.end():]
        if unnamed:
            return _plan(rest, Who((unnamed[0],), name=f"your {kind}"), known, mine)
        relations = _relations(rest)
        if relations is None or any(p.fullmatch(rest) for p in _ABOUT_RE):
            return None
        asks = stored(known, mine, _named(kind))
        if not asks:
            return Unknown(Who(mine, me=True), (), relations[0])
        return Lookup(Who(mine, me=True, kind=kind), asks, relations)
    if wanted is None:
        return None
    asks = stored(known, who.subjects, wanted)
    return Lookup(who, asks) if asks else Unknown(who, () if who.me else who.subjects, wanted[0])
