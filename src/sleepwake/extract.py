"""Facts from what a user says in chat: rules by default, a capable model on request.

Every fact reads as an English sentence, ``subject relation object``, because the
memory edits the model with the prompt ``subject relation`` and the target
`` object``. "I", "me", "my" and "we" become the user's name once it is known
(stated earlier in the conversation, or given), else ``ConversationState.default_subject``.

Relation vocabulary. A single-valued slot (where one lives, job, age...) always gets
the same relation, so a newer fact replaces an older one ("I moved to Denver" gives
"lives in"). List-valued relations (speaks, likes, is allergic to, has a <kind>
named, plays...) give one fact per item: a memory that replaces facts by subject and
relation keeps only the last of them. "favorite <thing> is" is the one relation that
does not read as a sentence ("Maria favorite color is green"): "Maria's" would need
the prompt without its space.

=========================  ===========================================  =====================
relation                   from                                         object
=========================  ===========================================  =====================
is named                   "my name is X", "I'm X", "call me X",        the name; the subject
                           "X here"                                     is always the default
is aged                    "I'm 34", "I just turned 40", "my age is"    digits: "34"
lives in                   "I live in / I'm based in / I moved to X"    place
lived in                   "I used to live in X", "moved from X to"     place
was born in / on           "I was born in Porto / on 3 May"             place / date
was born in the year       "I was born in 1985"                         year
is from                    "I'm from X", "I come from X"                place
works as                   "I'm a nurse", "I work as an engineer"       job with its article
works at                   "I work at / for X", "employed by X"         employer
studies / studies at       "I study X at Y", "I'm learning Korean"      subject / school
studied / studied at       "I studied X at Y"                           subject / school
speaks                     "I speak X", "fluent in X", "native ..."     one language a fact
has a <kind> named         "my sister Ana", "a dog called Rex"          name (kind as said,
                                                                        mom -> mother, ...)
is married to              "my wife Jane", "my husband is called Tom"   name
has a pet                  "I have a parrot"                            species
likes / loves /            "I like / enjoy / love / hate X",            one item a fact
dislikes / hates           "I don't like X", "I'm a big fan of X"
favorite <thing> is        "my favourite colour is green"               value (US spelling
                                                                        of the relation)
is allergic to             "I'm allergic to X", "an allergy to X"       one item a fact
drives                     "I drive a X", "my car is a X"               car with its article
owns                       "I own / bought / have a X"                  thing with its article
plays the / plays          "I play (the) guitar" / "I play tennis"      instrument / game
=========================  ===========================================  =====================

Family members and friends become subjects of their own: "my sister Ana lives in
Porto" gives (user, has a sister named, Ana) and (Ana, lives in, Porto); an unnamed
one is "<user>'s brother"; "Pedro's dog is called Toby" links Pedro to Toby. "She"/
"he" refer to the last such person named, in this message or an earlier one. Chat shorthand without "I"
("Just moved to Oslo!", "Currently living in Quito") is about the user.
Questions, hedges ("might", "want to", "if"), negations ("don't", "no longer") and
the assistant's turns give no facts: a wrong memory is worse than a missing one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sleepwake.errors import InvalidFactError
from sleepwake.facts import MAX_FIELD_CHARS, Fact


@dataclass
class ConversationState:
    """What the extractor remembers between the messages of one conversation."""

    user_name: str | None = None
    default_subject: str = "the user"
    last_person: str | None = None
    """Who "she"/"he" refers to: the last person named, also in an earlier message."""

    @property
    def subject(self) -> str:
        """Who "I" is: the user's name when known."""
        return self.user_name or self.default_subject


class Extractor(Protocol):
    def extract(self, message: str, state: ConversationState) -> list[Fact]: ...


def extract_turn(role: str, text: str, state: ConversationState, extractor: Extractor | None = None) -> list[Fact]:
    """Facts from one chat turn; only the user's own words are facts about the user."""
    if role != "user":
        return []
    return (extractor or RuleExtractor()).extract(text, state)


def extract_facts(message: str, state: ConversationState | None = None,
                  extractor: Extractor | None = None) -> list[Fact]:
    """Facts from one user message (a fresh conversation unless `state` is given)."""
    return (extractor or RuleExtractor()).extract(message, state or ConversationState())


def make_extractor(kind: str = "rules", generate: Callable[[str], str] | None = None) -> Extractor:
    """The extractor a configuration names: "rules" (default) or "model" (needs `generate`)."""
    if kind == "rules":
        return RuleExtractor()
    if kind == "model":
        if generate is None:
            raise ValueError("the 'model' extractor needs a generate function (prompt -> text)")
        return ModelExtractor(generate)
    raise ValueError(f"unknown extractor {kind!r}; choose one of: rules, model")


_LIST_RELATIONS = frozenset({"speaks", "likes", "loves", "dislikes", "hates", "is allergic to", "has a pet", "owns",
                             "plays", "plays the"})
_ITEM_SEPARATOR = re.compile(r",\s*(?:and\s+)?|\s+and\s+")


def is_list_relation(relation: str) -> bool:
    """Relations a subject can have several objects of: one language, one sister, ... each."""
    r = " ".join(relation.casefold().split())
    return r in _LIST_RELATIONS or (r.startswith("has a ") and r.endswith(" named"))


def split_items(obj: str) -> list[str]:
    """"English, French and Spanish" -> ["English", "French", "Spanish"]."""
    return [i for i in (p.strip() for p in _ITEM_SEPARATOR.split(obj)) if i]


def join_items(items: list[str]) -> str:
    """The object a memory stores for several items of a list-valued relation."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _fact(subject: str, relation: str, obj: str) -> Fact | None:
    try:
        return Fact(subject, relation, obj)
    except InvalidFactError:
        return None


def _dedupe(facts: list[Fact]) -> list[Fact]:
    seen: set[tuple[str, str, str]] = set()
    out = []
    for f in facts:
        k = (f.subject_key, f.relation.casefold(), f.object.casefold())
        if k not in seen:
            seen.add(k)
            out.append(f)
    return out


# ---------------------------------------------------------------- model extractor

_MODEL_PROMPT = """Extract the facts the user states about themselves or people they know.
Answer with only a JSON list of objects with the keys "subject", "relation" and "object", for example:
[{{"subject": "I", "relation": "lives in", "object": "Lisbon"}}, {{"subject": "Ana", "relation": "works as", "object": "a nurse"}}]
Use "I" for the user. "subject relation object" must read as an English sentence.
Answer [] if the message states no facts (questions, greetings, wishes, negations).

Message: {message}"""

_KEYS = {"subject", "relation", "object"}
_FIRST_PERSON = {"i", "me", "my", "myself", "we", "user", "the user"}


class ModelExtractor:
    """Asks a capable model for JSON triples and keeps only what parses strictly and
    whose object the user actually said (so a model cannot make facts up)."""

    def __init__(self, generate: Callable[[str], str]) -> None:
        self.generate = generate

    def extract(self, message: str, state: ConversationState) -> list[Fact]:
        reply = self.generate(_MODEL_PROMPT.format(message=message))
        facts = []
        for item in _first_json_list(reply):
            fact = self._fact(item, message, state)
            if fact is not None:
                facts.append(fact)
        return _dedupe(facts)

    @staticmethod
    def _fact(item: object, message: str, state: ConversationState) -> Fact | None:
        if not isinstance(item, dict) or set(item) != _KEYS:
            return None
        if not all(isinstance(v, str) and v.strip() and len(v) <= MAX_FIELD_CHARS for v in item.values()):
            return None
        subject, relation, obj = (" ".join(item[k].split()) for k in ("subject", "relation", "object"))
        if obj.casefold() not in " ".join(message.split()).casefold():
            return None  # hallucinated
        if subject.casefold() in _FIRST_PERSON:
            if relation.casefold() == "is named":
                state.user_name = obj
                return _fact(state.default_subject, relation, obj)
            subject = state.subject
        return _fact(subject, relation, obj)


def _first_json_list(text: str) -> list[object]:
    """The first JSON array in `text` (models wrap answers in prose); [] if none parses."""
    decoder = json.JSONDecoder()
    for start in (i for i, c in enumerate(text) if c == "["):
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, list):
            return value
    return []


# ---------------------------------------------------------------- lexicons

def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_OCCUPATIONS = _words("""
    accountant actor actress administrator agent analyst animator architect artist assistant astronaut
    attendant attorney auditor author baker banker barber barista barrister bartender biologist broker
    builder butcher captain caregiver carer carpenter cashier ceo chef chemist cleaner clerk coach coder
    consultant cook copywriter counselor counsellor courier dancer dentist designer detective developer
    dietitian diplomat director dj doctor driver economist editor electrician engineer entrepreneur
    farmer firefighter fisherman florist founder gardener geologist guard guide hairdresser historian
    illustrator influencer instructor interpreter janitor jeweller jeweler journalist judge lawyer
    lecturer librarian lifeguard linguist manager marketer mathematician mechanic midwife musician nanny
    nurse nutritionist officer optician painter paralegal paramedic pharmacist photographer physician
    physicist physiotherapist pilot plumber poet policeman policewoman politician postman priest
    producer professor programmer psychiatrist psychologist rabbi ranger realtor receptionist recruiter
    researcher sailor salesman saleswoman salesperson scientist secretary singer soldier solicitor
    statistician surgeon surveyor tailor teacher technician therapist trainer translator tutor
    veterinarian vet waiter waitress welder writer
""")
_LANGUAGES = _words("""
    afrikaans albanian amharic arabic armenian azerbaijani basque belarusian bengali bosnian bulgarian
    burmese cantonese catalan chinese croatian czech danish dutch english esperanto estonian farsi
    filipino finnish french galician georgian german greek gujarati hausa hebrew hindi hungarian
    icelandic igbo indonesian irish italian japanese kazakh khmer korean kurdish lao latin latvian
    lithuanian macedonian malay mandarin marathi mongolian nepali norwegian pashto persian polish
    portuguese punjabi romanian russian serbian sinhala slovak slovenian somali spanish swahili swedish
    tagalog tamil telugu thai tibetan turkish ukrainian urdu uzbek vietnamese welsh wolof xhosa yoruba zulu
""")
_NATIONALITIES = _words("""
    algerian american argentinian argentine australian austrian bangladeshi belgian bolivian brazilian
    british canadian chilean colombian cuban cypriot ecuadorian egyptian emirati ethiopian european
    ghanaian iranian iraqi israeli jamaican jordanian kenyan lebanese malaysian mexican moroccan
    nigerian pakistani peruvian scottish singaporean syrian taiwanese tunisian ugandan venezuelan
    asian african latina latino christian catholic muslim jewish buddhist hindu atheist
""")
# Words that follow "I'm" capitalised without being a name ("I'm Hungry").
_NOT_NAMES = _LANGUAGES | _NATIONALITIES | _words("""
    a an the not no so very just also still really here there home back in at on from with ok okay
    fine good great well tired sorry sure hungry thirsty busy bored happy sad angry sick ill cold hot
    late early ready done free new lost confused excited glad alone single married divorced retired
    pregnant vegan vegetarian afraid sleepy stressed worried curious awake online away all right
    i my we you he she it they this that these those hi hello hey thanks please yes
""")
_INSTRUMENTS = _words("""
    accordion bagpipes balalaika banjo bass bassoon bouzouki cello charango clarinet drums erhu flute
    guitar harmonica harp harpsichord horn keyboard keyboards koto mandolin oboe organ oud piano recorder
    saxophone sax shamisen sitar synthesizer tabla trombone trumpet tuba ukulele viola violin xylophone
""")
_PETS = _words("""
    budgie bunny canary cat chicken cockatiel dog donkey ferret fish gecko goat goldfish hamster
    hedgehog horse iguana kitten lizard mouse parrot pig pony puppy rabbit rat snake tortoise turtle
""")
_POSSESSIONS = _words("""
    apartment bicycle bike boat cabin camera camper car caravan cottage e-bike flat house laptop
    motorbike motorcycle moped scooter tractor truck van yacht
""")
_RELATIVES = (
    "brother-in-law|sister-in-law|mother-in-law|father-in-law|son-in-law|daughter-in-law|"
    "best friend|boyfriend|girlfriend|friend|twin sister|twin brother|sister|brother|mother|mom|mum|"
    "mama|father|dad|papa|son|daughter|wife|husband|spouse|partner|fiancée|fiancé|fiancee|fiance|"
    "cousin|aunt|uncle|grandmother|grandma|granny|grandfather|grandpa|granddad|grandson|granddaughter|"
    "niece|nephew|roommate|flatmate|housemate|colleague|coworker|co-worker|boss|neighbour|neighbor|"
    "classmate|child|kid|baby|twin|stepmother|stepfather|stepson|stepdaughter"
)
_KIND_NAMES = {"mom": "mother", "mum": "mother", "mama": "mother", "dad": "father", "papa": "father",
               "grandma": "grandmother", "granny": "grandmother", "grandpa": "grandfather",
               "granddad": "grandfather", "kid": "child", "colour": "color", "favourite": "favorite"}
_SPOUSES = {"wife", "husband", "spouse"}

_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_NUMBER_WORDS = re.compile(r"[-\s]+")
_NUMBER = rf"\d{{1,3}}|(?:{'|'.join(_TENS)})(?:[-\s](?:{'|'.join(_ONES[1:10])}))?|{'|'.join(_ONES)}"


def _number(text: str) -> str | None:
    """'34', 'thirty-two' -> digits; None if not a plausible age."""
    words = _NUMBER_WORDS.split(text.lower())
    if words[0].isdigit():
        n = int(words[0])
    elif words[0] in _TENS:
        n = 20 + 10 * _TENS.index(words[0]) + (_ONES.index(words[1]) if len(words) > 1 else 0)
    else:
        n = _ONES.index(words[0])
    return str(n) if 0 < n < 130 else None


# ---------------------------------------------------------------- text shaping

def _ci(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


_QUOTED = re.compile(r"(?<!\w)(['\"“‘]).*?(?:\1|[”’])(?!\w)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\s*\n+\s*")
_ABBREVIATION = re.compile(r"\b(?:St|Dr|Mr|Mrs|Ms|Prof|Jr|Sr|Mt|e\.g|i\.e|vs)\.$")
_QUESTION_START = _ci(
    r"^(?:where|what|who|whom|whose|how|when|why|which|do|does|did|can|could|would|will|shall|should|"
    r"is|are|am|was|were)\b")
_CONTRACTIONS = [(_ci(p), r) for p, r in [
    (r"\bcan't\b", "cannot"), (r"\bwon't\b", "will not"), (r"n't\b", " not"),
    (r"\b(I)'m\b", r"\1 am"), (r"\b(we|you|they)'re\b", r"\1 are"), (r"\b(I|we|you|they)'ve\b", r"\1 have"),
    (r"\b(he|she|it|that|there|name)'s\b", r"\1 is"), (r"\b(\w+)'s(?=\s+an?\s)", r"\1 is"), (r"'ll\b", " will"),
    (r"\b(I|we|you|he|she|they)'d\b", r"\1 would"),
]]
# A clause starts with a subject, or a verb whose subject is the previous clause's.
_SEPARATOR = _ci(r"\s*[,;:]\s*(?:and\s+|but\s+|so\s+)?|\s+(?:and|but|so)\s+")
_VERBS = (r"(?:live|lives|work|works|play|plays|speak|speaks|study|studies|studied|moved|grew|allergic|born|"
          r"was|were|have|has|love|loves|like|likes|hate|hates|enjoy|enjoys|own|owns|drive|drives|am|is|got|"
          r"living|working|studying|based)")
_CLAUSE_START = _ci(rf"^(?:(?:now|then|also|actually)\s+)?(?:(?:i|we|my|she|he)\b|{_VERBS}\b)")
_NAME_THEN_VERB = re.compile(rf"^[^\s,]+(?:\s+[^\s,]+)?\s+{_VERBS}\b")
_LEAD = _ci(
    r"^(?:(?:and|but|so|also|actually|anyway|well|oh|btw|now|then|these days|nowadays|currently|recently|"
    r"right now|at the moment|by the way|fyi|for the record|just so you know|honestly|frankly|basically|"
    r"personally|seriously|luckily|fortunately|unfortunately|sadly|yeah|yes|ok|okay|um|fun fact|"
    r"hey there|hi there|hi|hello|hey|good (?:morning|afternoon|evening))\b[,:!\s]*)+")
_REMEMBER = _ci(r"^(?:please\s+)?(?:remember|note|keep in mind|do not forget|never forget)\s+(?:that\s+)?")
# Checked on the clause with its first letter lowered, so the month "May" is no hedge.
_HEDGE = re.compile(
    r"\b(?:not|never|no longer|might|may|maybe|perhaps|probably|would|could|should|wish|want|wants|"
    r"wanted|hope|hopes|hoping|thinking|considering|planning|plan|plans|going to|will|if|unless|"
    r"someday|one day|anymore)\b")
_NEGATIVE_LIKES = _ci(r"\b(?:do|does|did) not (?:like|enjoy)\b|\bcan ?not stand\b")
_CUT = _ci(
    r"\s+(?:with|since|for|because|as|while|when|where|which|who|though|although|until|every|last|next|"
    r"these days|nowadays|lately|currently|now|today|tonight|yesterday|tomorrow|anymore|again|too|"
    r"as well|right now|at the moment|recently|btw|by the way|so far|already|originally|is|are|was|were|"
    r"in (?:january|february|march|april|may|june|july|august|september|october|november|december|\d{4})|"
    r"\S+ (?:years?|months?|weeks?|days?) ago)\b.*$")
_LIST_SEPARATOR = _ci(r"\s*,\s*(?:and\s+|or\s+)?|\s+(?:and|or|&)\s+")
_FIRST_ITEM = _ci(r"\s*[,;]|\s+and\s+")
_PLAY_CUT = _ci(r"\s+(?:in|on|at|with)\b.*$")
_THE = _ci(r"^the\s+")
_ARTICLE = _ci(r"^an?\s")
_YEAR = re.compile(r"\d{4}")
_LETTERS = re.compile(r"[^\W\d_]+")
_JOB_PLACE = _ci(r"\s+(?:in|from|of)\s.*$")  # "a dentist in Kraków" -> "a dentist"
_BORN_PARTS = _ci(r"(?P<prep>in|on)\s+(?P<value>.+?)(?=\s+(?:on\s|in\s+\d{4}\b)|$)")
# Pronouns, and possessives that would read wrongly after a third-person subject ("Maria loves my job").
_JUNK_OBJECT = _words("it that this them him her you your there here something anything everything nothing "
                      "someone me us my our his their")
_MAX_OBJECT_WORDS = 8


def _sentences(message: str) -> list[str]:
    """Sentences, not split after abbreviations such as "St." in "St. Mary's"."""
    out: list[str] = []
    for piece in _SENTENCE_END.split(_QUOTED.sub(" ", message.replace("’", "'"))):
        if out and _ABBREVIATION.search(out[-1]):
            out[-1] += " " + piece
        elif piece.strip():
            out.append(piece.strip())
    return out


def _expand(sentence: str) -> str:
    for pattern, repl in _CONTRACTIONS:
        sentence = pattern.sub(repl, sentence)
    return sentence


def _clauses(sentence: str) -> list[str]:
    """Split at commas and conjunctions only where a new subject or verb follows, so that
    lists ("English, French and Arabic") stay whole."""
    parts: list[str] = []
    pos = 0
    for m in _SEPARATOR.finditer(sentence):
        following = sentence[m.end():]
        if _CLAUSE_START.match(following) or _NAME_THEN_VERB.match(following) and _is_name_word(following.split()[0]):
            parts.append(sentence[pos:m.start()])
            pos = m.end()
    parts.append(sentence[pos:])
    return [p.strip(" .!") for p in parts if p.strip(" .!")]


def _is_name_word(word: str) -> bool:
    return word[:1].isalpha() and not word[:1].islower()


_NAME_WORD = re.compile(r"\s*([^\W\d_][\w'-]*)")


def _take_name(text: str, relaxed: bool = False) -> tuple[str, str] | None:
    """A leading name (up to four capitalised words) and what follows it."""
    words: list[str] = []
    pos = 0
    while len(words) < 4 and (m := _NAME_WORD.match(text, pos)) and m[1].casefold() not in _NOT_NAMES and (
            _is_name_word(m[1]) or relaxed and not words):
        words.append(m[1])
        pos = m.end()
    if not words:
        return None
    return " ".join(words), text[pos:]


def _tidy(text: str) -> str:
    return _CUT.sub("", text).strip(" .,!;:\"'()")


def _object(text: str) -> str | None:
    """A single-valued object: the first item, without trailing time phrases."""
    obj = _tidy(_FIRST_ITEM.split(_tidy(text))[0])
    words = obj.split()
    if not words or words[0].casefold() in _JUNK_OBJECT or len(words) > _MAX_OBJECT_WORDS:
        return None
    return obj


def _items(text: str) -> list[str]:
    """Objects of a list-valued relation: "cats and penicillin" -> two."""
    items = [_object(part) for part in _LIST_SEPARATOR.split(_tidy(text))]
    return [o for o in items if o] if all(items) else []


def _article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"


def _kind(word: str) -> str:
    return " ".join(_KIND_NAMES.get(w, w) for w in word.lower().split())


# ---------------------------------------------------------------- predicates

Pairs = list[tuple[str, str]]
_ADV = (r"(?:(?:just|recently|also|now|currently|still|actually|really|absolutely|totally|originally|"
        r"always|definitely|even|only|already|finally|happily|very|severely|highly|so|pretty|quite|started|began)\s+)*")
_BE = rf"(?:am|is|are)\s+{_ADV}"
_BE_OPT = rf"(?:{_BE})?"  # before a participle: "I'm living in", or shorthand "living in"


def _p(body: str) -> re.Pattern[str]:
    return _ci(rf"^{_ADV}(?:{body})")


def _one(relation: str) -> Callable[[re.Match[str]], Pairs]:
    return lambda m: [(relation, o)] if (o := _object(m["obj"])) else []


def _many(relation: str) -> Callable[[re.Match[str]], Pairs]:
    return lambda m: [(relation, o) for o in _items(m["obj"])]


def _favorite(m: re.Match[str]) -> Pairs:
    return [(f"favorite {_kind(m['what'])} is", o)] if (o := _object(m["obj"])) else []


def _age(m: re.Match[str]) -> Pairs:
    return [("is aged", n)] if (n := _number(m["n"])) else []


def _moved(m: re.Match[str]) -> Pairs:
    old = [("lived in", o)] if m["old"] and (o := _object(m["old"])) else []
    return _one("lives in")(m) + old


def _born(m: re.Match[str]) -> Pairs:
    """'in Nairobi on 12 June 1988', 'in 北京 in 1990': place, date and year."""
    pairs = []
    for part in _BORN_PARTS.finditer(m["obj"]):
        if (obj := _object(part["value"])) is None:
            continue
        if part["prep"].lower() == "on":
            pairs.append(("was born on", obj))
        else:
            pairs.append(("was born in the year" if _YEAR.fullmatch(obj) else "was born in", obj))
    return pairs


def _job(m: re.Match[str], *, known_only: bool = False) -> Pairs:
    """'a doctor at St. Mary's' -> works as a doctor, works at St. Mary's."""
    job, _, place = _tidy(m["obj"]).partition(" at ")
    job = _object(_JOB_PLACE.sub("", job))
    if job is None or known_only and job.split()[-1].lower() not in _OCCUPATIONS:
        return []
    return [("works as", job)] + ([("works at", o)] if place and (o := _object(place)) else [])


def _employer(m: re.Match[str]) -> Pairs:
    org, _, job = m["obj"].partition(" as ")
    pairs = [("works at", o)] if (o := _object(org)) else []
    return pairs + ([("works as", j)] if _ARTICLE.match(job) and (j := _object(job)) else [])


def _study(relation: str) -> Callable[[re.Match[str]], Pairs]:
    def pairs(m: re.Match[str]) -> Pairs:
        field, _, school = (" " + _tidy(m["obj"])).partition(" at ")
        out = [(relation, o)] if (o := _object(field.partition(" in ")[0])) else []
        return out + ([(relation + " at", s)] if (s := _object(school)) else [])
    return pairs


def _languages(text: str) -> Pairs:
    return [("speaks", w) for w in _LETTERS.findall(text) if w.lower() in _LANGUAGES]


def _plays(m: re.Match[str]) -> Pairs:
    out = []
    for item in _items(m["obj"]):
        item = _PLAY_CUT.sub("", _THE.sub("", item))
        if item.lower() in _INSTRUMENTS or m["obj"].lower().startswith("the "):
            out.append(("plays the", item))
        elif item:
            out.append(("plays", item))
    return out


def _owned(obj: str | None) -> bool:
    """A thing worth remembering owning: a vehicle, a home, or a brand ("a Tesla")."""
    return bool(obj and _ARTICLE.match(obj)) and (
        obj.split()[-1].lower() in _POSSESSIONS or any(_is_name_word(w) for w in obj.split()[1:]))


def _bought(m: re.Match[str]) -> Pairs:
    obj = _object(m["obj"])
    return [("owns", obj)] if obj and _owned(obj) else []


_NAMED_KIND = _ci(r"\b(?:an?|one)\s+(?P<kind>[a-z][\w'-]*(?:\s+[a-z][\w'-]*){0,2}?)\s+(?:named|called)\s+")
_COUNTED_KINDS = _ci(rf"^(?:{_NUMBER})\s+(?P<kind>[a-z]+?)(?:ies|s)?\s*[,:]?\s+(?:named\s+|called\s+)?(?P<names>.+)$")
_PET = _ci(rf"^(?:an?|one)\s+(?:\w+\s+)?(?P<kind>{'|'.join(sorted(_PETS))})$")


def _link(kind: str, name: str) -> tuple[str, str]:
    """The user's tie to a person or pet: (is married to, Jane) or (has a sister named, Ana)."""
    kind = _kind(kind)
    return ("is married to", name) if kind in _SPOUSES else (f"has {_article(kind)} {kind} named", name)


def _has(m: re.Match[str]) -> Pairs:
    """Named people and pets, unnamed pets, and owned things."""
    obj = _tidy(m["obj"])
    named = [_link(k["kind"], n[0]) for k in _NAMED_KIND.finditer(obj) if (n := _take_name(obj[k.end():]))]
    if named:
        return named
    if c := _COUNTED_KINDS.match(obj):
        names = [n[0] for part in _LIST_SEPARATOR.split(c["names"]) if (n := _take_name(part))]
        return [_link(c["kind"], n) for n in names]
    if p := _PET.match(obj):
        return [("has a pet", p["kind"].lower())]
    return _bought(m)


_PREDICATES: list[tuple[re.Pattern[str], Callable[[re.Match[str]], Pairs]]] = [
    (_p(r"my\s+favou?rite\s+(?P<what>[a-z]+(?:\s+[a-z]+)?)\s+is\s+(?P<obj>.+)"), _favorite),
    (_p(rf"my\s+age\s+is\s+(?P<n>{_NUMBER})$"), _age),
    (_p(rf"{_BE}(?P<n>{_NUMBER})(?:\s+(?:years?|yrs?)(?:\s+old)?|\s+y/?o)?(?:\s+now)?(?:\s+(?:and|but)\s.*)?$"), _age),
    (_p(rf"turned\s+(?P<n>{_NUMBER})\b"), _age),
    (_p(rf"(?:live|lives|reside|resides|{_BE_OPT}(?:living|based|residing)|(?:have|has)\s+(?:been\s+living|lived))"
        r"\s+in\s+(?P<obj>.+)"), _one("lives in")),
    (_p(rf"(?:(?:have|has)\s+{_ADV})?(?:moved|relocated)\s+(?:back\s+)?(?:from\s+(?P<old>.+?)\s+)?to\s+(?P<obj>.+)"), _moved),
    (_p(r"(?:used\s+to\s+live|lived)\s+in\s+(?P<obj>.+)"), _one("lived in")),
    (_p(r"(?:(?:was|were)\s+)?born\s+(?:and\s+(?:raised|bred)\s+)?(?P<obj>(?:in|on)\s+.+)"), _born),
    (_p(rf"(?:{_BE}|comes?\s+{_ADV})from\s+(?P<obj>.+)"), _one("is from")),
    (_p(rf"(?:work|works|{_BE_OPT}working|(?:have|has)\s+(?:been\s+working|worked))\s+as\s+(?P<obj>an?\s+.+)"),
     _job),
    (_p(rf"(?:work|works|{_BE_OPT}working|(?:have|has)\s+(?:been\s+working|worked))\s+(?:from\s+home\s+)?"
        r"(?:at|for)\s+(?P<obj>.+)"),
     _employer),
    (_p(rf"{_BE}employed\s+(?:by|at)\s+(?P<obj>.+)"), _employer),
    (_p(r"(?:(?:have|has)\s+)?(?:got|landed|started)\s+a\s+(?:new\s+)?job\s+(?:at|with)\s+(?P<obj>.+)"),
     _one("works at")),
    (_p(rf"{_BE}(?:a\s+)?(?:big\s+|huge\s+|great\s+)?fan\s+of\s+(?P<obj>.+)"), _many("likes")),
    (_p(rf"{_BE}an?\s+(?:big\s+|huge\s+|great\s+)?(?P<obj>.+?)\s+fan$"), _many("likes")),
    (_p(rf"{_BE}into\s+(?P<obj>.+)"), _many("likes")),
    (_p(rf"{_BE}an?\s+(?:\w+\s+)?student\s+at\s+(?P<obj>.+)"), _one("studies at")),
    (_p(rf"(?:{_BE}|(?:have|has)\s+been\s+{_ADV})(?P<obj>an?\s+.+)"), lambda m: _job(m, known_only=True)),
    (_p(rf"(?:study|studies|{_BE_OPT}studying)\s+(?P<obj>.+)"), _study("studies")),
    (_p(r"studied\s+(?P<obj>.+)"), _study("studied")),
    (_p(rf"{_BE}majoring\s+in\s+(?P<obj>.+)"), _one("studies")),
    (_p(rf"{_BE}doing\s+an?\s+(?:phd|ph\.d\.|master'?s|bachelor'?s|degree|doctorate)(?:\s+degree)?\s+in\s+(?P<obj>.+)"),
     _one("studies")),
    (_p(rf"{_BE}learning\s+(?P<obj>(?!(?:a|an|the|to|how|about|from|so|that|this|it|more|much|lots)\b).+)"),
     _one("studies")),
    (_p(r"(?:speak|speaks|can\s+speak)\s+(?P<obj>.+)"), lambda m: _languages(m["obj"])),
    (_p(rf"{_BE}fluent\s+in\s+(?P<obj>.+)"), lambda m: _languages(m["obj"])),
    (_p(rf"(?:{_BE})?allergic\s+to\s+(?P<obj>.+)"), _many("is allergic to")),
    (_p(r"(?:have|has)(?:\s+got)?\s+an?\s+(?:\w+\s+)?allergy\s+to\s+(?P<obj>.+)"), _many("is allergic to")),
    (_p(r"(?:have|has)(?:\s+got)?\s+an?\s+(?:severe\s+|mild\s+|bad\s+)?(?P<obj>[^\W\d_]+(?:\s+[^\W\d_]+)?)"
        r"\s+allergy$"), _many("is allergic to")),
    (_p(r"(?:(?:have|has)(?:\s+got|\s+adopted)?|got|adopted)\s+(?P<obj>.+)"), _has),
    (_p(r"(?:own|owns)\s+(?P<obj>.+)"), _one("owns")),
    (_p(r"(?:(?:have|has)\s+)?bought\s+(?P<obj>an?\s+.+)"), _bought),
    (_p(r"(?:drive|drives)\s+(?P<obj>an?\s+.+)"), _one("drives")),
    (_p(r"my\s+car\s+is\s+(?P<obj>an?\s+.+)"), _one("drives")),
    (_p(r"(?:play|plays)\s+(?P<obj>(?!with\b|around\b|a\s+lot\b).+)"), _plays),
    (_p(r"(?:like|likes|enjoy|enjoys|adore|adores)\s+(?P<obj>.+)"), _many("likes")),
    (_p(r"(?:love|loves)\s+(?P<obj>.+)"), _many("loves")),
    (_p(r"(?:hate|hates|detest|detests)\s+(?P<obj>.+)"), _many("hates")),
    (_p(r"(?:dislike|dislikes|(?:do|does)\s+not\s+(?:like|enjoy)|can\s*not\s+stand)\s+(?P<obj>.+)"), _many("dislikes")),
]


def _predicates(text: str) -> Pairs:
    """(relation, object) pairs of the first predicate that matches the clause's rest."""
    text = text.strip(" .,!;:")
    for pattern, pairs in _PREDICATES:
        if m := pattern.match(text):
            return pairs(m)
    return []


# ---------------------------------------------------------------- rule extractor

class _Me:
    """The user: resolved to a name only when a fact is made, since it can change mid-message."""


_ME = _Me()
Subject = str | _Me


_KINDS = rf"{_RELATIVES}|{'|'.join(sorted(_PETS))}"
_FAVORITE_FIRST = _ci(r"^(?P<obj>.+?)\s+is\s+my\s+favou?rite\s+(?P<what>[a-z]+(?:\s+[a-z]+)?)$")
_MY_LANGUAGE = r"my\s+(?:first\s+|native\s+|mother\s+)(?:language|tongue)"  # before "my mother ..."
_LANGUAGE_FIRST = _ci(rf"^(?P<obj>[^\W\d_]+)\s+is\s+{_MY_LANGUAGE}$|^{_MY_LANGUAGE}\s+is\s+(?P<obj2>.+)$")
_CALL_ME = _ci(r"\bcall\s+me\s+(?P<rest>.+)")
_NAME_IS = _ci(r"^(?:(?:my|the)\s+)?(?:full\s+|first\s+|real\s+)?name\s+is\s+(?P<rest>.+)")
_NAME_HERE = _ci(r"^(?P<rest>.+?)\s+here$")
_I_AM = _ci(r"^am\s+(?P<rest>.+)")
_FROM = _ci(r"^\s+from\s")
_FIRST_PERSON_START = _ci(r"^(?:i|we)\s+(?P<rest>.+)")
_MY_START = _ci(r"^(?:my|our)\s")
_PRONOUN_START = _ci(r"^(?:she|he)\s+(?P<rest>.+)")
# "Just moved to Oslo!": chat shorthand that leaves out "I".
_SHORTHAND = _ci(rf"^{_ADV}(?:living|based|working|studying|born|moved|relocated|adopted|got)\b")
# "my sister ...", "my older brother ...", "Pedro's dog ..."
_KIND_OF = _ci(rf"^(?P<owner>my|our|[^\W\d_][\w-]*(?:\s+[^\W\d_][\w-]*)?'s)\s+"
               rf"(?:(?:older|younger|elder|eldest|oldest|youngest|big|little|baby)\s+)?(?P<kind>{_KINDS})\b(?P<after>.*)")
_KIND_NAMED = _ci(r"^(?:'s\s+name\s+is|\s+is\s+(?:called|named)|,?\s+(?:called|named))\s+(?P<rest>.+)")
_APPOSITION = re.compile(r"^,?\s+\S")
_THEN_LOWER = re.compile(r"\s+[a-z]")  # a name followed by a verb: "Ana lives ..."


class RuleExtractor:
    """Facts from patterns over clauses; precise rather than exhaustive (see module docstring)."""

    def extract(self, message: str, state: ConversationState) -> list[Fact]:
        facts: list[Fact] = []
        person = state.last_person  # who "she"/"he" is
        for sentence in _sentences(message):
            if sentence.endswith("?") or _QUESTION_START.match(sentence):
                continue
            subject: Subject | None = None
            for clause in _clauses(_expand(sentence)):
                subject, person, found = self._clause(clause, subject, person, state)
                facts += found
        state.last_person = person
        return _dedupe(facts)

    def _clause(self, clause: str, subject: Subject | None, person: str | None,
                state: ConversationState) -> tuple[Subject | None, str | None, list[Fact]]:
        """Facts of one clause; returns the subject a following verb-first clause inherits,
        and who "she"/"he" is now."""
        clause = _REMEMBER.sub("", _LEAD.sub("", clause))
        if not clause or _HEDGE.search(_NEGATIVE_LIKES.sub("", clause[0].lower() + clause[1:])):
            return subject, person, []
        facts: list[Fact] = []

        def emit(who: Subject, pairs: Pairs) -> None:
            name = state.subject if isinstance(who, _Me) else who
            facts.extend(f for r, o in pairs if (f := _fact(name, r, o)))

        def named(text: str, relaxed: bool = False) -> bool:
            """Records the user's stated name, and where they are from if that follows."""
            if (taken := _take_name(text, relaxed)) is None:
                return False
            state.user_name = taken[0]
            emit(state.default_subject, [("is named", taken[0])])
            if _FROM.match(taken[1]):
                emit(_ME, _predicates("am" + taken[1]))
            return True

        whole = clause.strip(" .!")
        if m := _FAVORITE_FIRST.match(whole):
            emit(_ME, _favorite(m))
            return _ME, person, facts
        if m := _LANGUAGE_FIRST.match(whole):
            emit(_ME, _languages(m["obj"] or m["obj2"]))
            return _ME, person, facts
        if m := _CALL_ME.search(clause) or _NAME_IS.match(clause):
            named(m["rest"], relaxed=m.re is _NAME_IS)
            return _ME, person, facts
        if (m := _NAME_HERE.match(whole)) and (taken := _take_name(m["rest"])) and not taken[1]:
            named(m["rest"])
            return _ME, person, facts

        rest = clause
        if m := _FIRST_PERSON_START.match(clause):
            subject, rest = _ME, m["rest"]
        elif (m := _KIND_OF.match(clause)) and (owner := self._owner(m["owner"])):
            person, rest = self._relative(owner, m["kind"], m["after"], emit, state)
            subject = person
        elif _MY_START.match(clause):
            subject = _ME
        elif m := _PRONOUN_START.match(clause):
            subject, rest = person, m["rest"]
        elif _SHORTHAND.match(clause) and subject is None:
            subject = _ME
        elif (taken := _take_name(clause)) and _THEN_LOWER.match(taken[1]):
            subject, rest = taken[0], taken[1]
            person = subject
        if subject is None:
            return None, person, facts

        if isinstance(subject, _Me) and (m := _I_AM.match(rest)) and named(m["rest"]):
            return subject, person, facts
        emit(subject, _predicates(rest))
        linked = [f.object for f in facts if f.relation.endswith(" named") or f.relation == "is married to"]
        return subject, (linked[-1] if linked else person), facts

    @staticmethod
    def _owner(text: str) -> Subject | None:
        """'my' -> the user; "Pedro's" -> Pedro; anything else is no owner."""
        if text.lower() in ("my", "our"):
            return _ME
        name = text[:-2]
        taken = _take_name(name)
        return name if taken and not taken[1] else None

    @staticmethod
    def _relative(owner: Subject, kind: str, after: str, emit: Callable[[Subject, Pairs], None],
                  state: ConversationState) -> tuple[str, str]:
        """'my sister Ana ...' links the user to Ana and makes Ana the subject;
        'my brother ...' makes "<user>'s brother" the subject. Returns (subject, rest)."""
        kind = _kind(kind)
        if n := _KIND_NAMED.match(after):
            taken = _take_name(n["rest"], relaxed=True)
        else:
            taken = _take_name(after.lstrip(" ,")) if _APPOSITION.match(after) else None
        if taken is None:
            whose = state.subject if isinstance(owner, _Me) else owner
            return f"{whose}'s {kind}", after.strip(" ,")
        emit(owner, [_link(kind, taken[0])])
        return taken[0], taken[1].strip(" ,")
