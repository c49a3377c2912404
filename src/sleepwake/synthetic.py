"""Deterministic fictional facts for tests and benchmarks.

Edits must be measured on facts the model cannot already know, so subjects are
invented people ("Zofia Wróblewska lives in Valparaíso"). Names are built from
first-name and surname pools of one culture at a time, so they read as real
names and tokenize like real names (including non-ASCII letters), while the
pairings avoid the names of well-known people. (Someone obscure may well share
a name; what matters is that the model has no prior belief about it.)

Everything here is a pure function of its arguments: the same call gives the
same list on every machine and Python version. We draw only from
``random.Random(seed).random()``, whose sequence Python guarantees to keep
stable, and do our own index arithmetic and shuffling rather than rely on
``choice``/``shuffle``/``sample``, whose algorithms may change.
"""

from __future__ import annotations

import random

from sleepwake.facts import Fact

__all__ = ["RELATIONS", "fictional_facts", "fictional_people", "lifelong_facts", "max_people"]

# ---------------------------------------------------------------------------
# Relations: (relation, question template with {s}, pool of objects).
# Objects are single words or short phrases that read naturally after
# "subject relation". Pools that follow "a" start with a consonant sound.
# ---------------------------------------------------------------------------

_CITIES = [
    "Lisbon", "Kraków", "Valparaíso", "Tampere", "Ljubljana", "Bergen", "Porto",
    "Montevideo", "Gdańsk", "Zürich", "Malmö", "Reykjavík", "Tallinn", "Bologna",
    "Seville", "Edinburgh", "Marseille", "Antwerp", "Salzburg", "Thessaloniki",
    "Wellington", "Halifax", "Cusco", "Hobart", "Kyoto", "Busan", "Adelaide",
    "Łódź", "São Paulo", "Bogotá", "東京", "Nantes", "Trieste", "Brno",
]
_BIRTHPLACES = [
    "Innsbruck", "Cork", "Aarhus", "Lyon", "Córdoba", "Poznań", "Turku", "Graz",
    "Rotterdam", "Plovdiv", "Coimbra", "Valencia", "Leipzig", "Genoa", "Bilbao",
    "Dundee", "Uppsala", "Toulouse", "Wrocław", "Ostrava", "Riga", "Mendoza",
    "Osaka", "Quebec City", "Perth", "Nagasaki", "Tromsø", "Cluj-Napoca",
    "Split", "Debrecen",
]
_JOBS = [
    "baker", "carpenter", "dentist", "nurse", "pilot", "librarian", "plumber",
    "veterinarian", "journalist", "translator", "pharmacist", "firefighter",
    "lawyer", "mechanic", "photographer", "tailor", "beekeeper", "cartographer",
    "locksmith", "florist", "surgeon", "geologist", "chef", "teacher", "farmer",
    "barista", "potter", "sommelier", "zookeeper", "watchmaker",
]
_DOG_NAMES = [
    "Biscuit", "Pepper", "Mochi", "Kasztan", "Noodle", "Ziggy", "Waffles",
    "Bruno", "Pistachio", "Rufus", "Tofu", "Clementine", "Gizmo", "Pierogi",
    "Marmite", "Juniper", "Bamboo", "Sprocket", "Basil", "Toffee", "Chorizo",
    "Dumpling", "Figaro", "Pumpernickel", "Nugget", "Saffron", "Bubbles",
]
_CAT_NAMES = [
    "Miso", "Pickles", "Ophelia", "Marzipan", "Tiberius", "Cinnamon", "Luna",
    "Socks", "Pudding", "Ravioli", "Nimbus", "Truffle", "Mittens", "Cleo",
    "Sardine", "Jasper", "Paprika", "Wasabi", "Moomin", "Hazel", "Barnaby",
    "Pixel", "Sesame", "Crumpet", "Matcha",
]
_INSTRUMENTS = [
    "cello", "oboe", "violin", "bassoon", "harp", "accordion", "banjo",
    "trombone", "clarinet", "flute", "ukulele", "mandolin", "saxophone", "tuba",
    "harmonica", "bagpipes", "marimba", "sitar", "didgeridoo", "piano", "drums",
    "trumpet", "viola", "French horn", "xylophone", "balalaika", "theremin",
    "harpsichord", "bouzouki",
]
_LANGUAGES = [
    "Portuguese", "Finnish", "Swahili", "Icelandic", "Hungarian", "Tagalog",
    "Welsh", "Basque", "Estonian", "Korean", "Turkish", "Dutch", "Polish",
    "Greek", "Hebrew", "Hindi", "Vietnamese", "Czech", "Romanian", "Catalan",
    "Norwegian", "Ukrainian", "Malay", "Thai", "Amharic", "Georgian",
    "Armenian", "Irish",
]
_CARS = [
    "Volvo", "Toyota", "Škoda", "Peugeot", "Fiat", "Subaru", "Renault",
    "Citroën", "Mazda", "Kia", "Hyundai", "Tesla", "Jeep", "Saab", "Lada",
    "Dacia", "Seat", "Mini", "Nissan", "Honda", "Volkswagen", "Porsche",
    "Land Rover", "Chevrolet", "Lancia", "Suzuki",
]
_ALLERGENS = [
    "peanuts", "shellfish", "cats", "pollen", "penicillin", "strawberries",
    "bee stings", "latex", "dust mites", "sesame", "kiwi", "eggs", "gluten",
    "mustard", "celery", "horses", "hazelnuts", "soy", "mold", "wasp stings",
    "tomatoes", "almonds", "mangoes", "feathers", "nickel", "walnuts",
]
_FIELDS = [
    "astronomy", "linguistics", "marine biology", "economics",
    "medieval history", "organic chemistry", "philosophy",
    "mechanical engineering", "architecture", "oceanography", "botany",
    "archaeology", "statistics", "music theory", "geology", "neuroscience",
    "veterinary medicine", "anthropology", "mathematics", "law", "journalism",
    "robotics", "ecology", "art history", "climatology", "epidemiology",
]
# Invented company names: plausible, but not the names of well-known firms.
_COMPANIES = [
    "Nordlicht Logistics", "Brightwater Analytics", "Kestrel Robotics",
    "Pelican Bay Bakery", "Ironbark Software", "Zielony Młyn", "Solvara Energy",
    "Tidewell Pharmaceuticals", "Quillfeather Press", "Marbleglen Studios",
    "Copperleaf Insurance", "Verdant Loop", "Bluefin Maritime",
    "Cedarpoint Labs", "Lumenfield Optics", "Saffron Table Catering",
    "Granite Peak Outfitters", "Moonrake Games", "Driftwood Media",
    "Fernhollow Clinic", "Orchard Lane Books", "Silverthread Textiles",
    "Stellwerk Engineering", "Vantablue Aerospace", "Harrowgate Ceramics",
    "Ostwind Solar", "Pinecrest Dairy",
]
_COLLECTIONS = [
    "stamps", "vinyl records", "antique maps", "postcards", "seashells",
    "fountain pens", "old coins", "comic books", "teapots", "matchboxes",
    "pressed flowers", "vintage cameras", "board games", "meteorites",
    "snow globes", "model trains", "beer mats", "fossils", "keychains",
    "typewriters", "cactus plants", "pocket watches", "tin soldiers",
    "movie posters", "rare books",
]

RELATIONS: list[tuple[str, str, list[str]]] = [
    ("lives in", "Where does {s} live?", _CITIES),
    ("works as a", "What does {s} work as?", _JOBS),
    ("has a dog named", "What is the name of {s}'s dog?", _DOG_NAMES),
    ("plays the", "Which instrument does {s} play?", _INSTRUMENTS),
    ("was born in", "Where was {s} born?", _BIRTHPLACES),
    ("speaks", "What language does {s} speak?", _LANGUAGES),
    ("drives a", "What car does {s} drive?", _CARS),
    ("is allergic to", "What is {s} allergic to?", _ALLERGENS),
    ("studies", "What does {s} study?", _FIELDS),
    ("works at", "Where does {s} work?", _COMPANIES),
    ("has a cat named", "What is the name of {s}'s cat?", _CAT_NAMES),
    ("collects", "What does {s} collect?", _COLLECTIONS),
]

# ---------------------------------------------------------------------------
# Name pools. Each culture: (female first names, male first names, surnames as
# (masculine, feminine) pairs, identical where the language has no gendered
# surnames). First names and surnames are deliberately uncommon-ish and were
# chosen so that no pairing within a culture names a well-known person.
# ---------------------------------------------------------------------------

_Pool = tuple[list[str], list[str], list[tuple[str, str]]]


def _same(*names: str) -> list[tuple[str, str]]:
    return [(n, n) for n in names]


def _sky(*stems: str) -> list[tuple[str, str]]:
    """Polish -ski/-cki surnames and their feminine -ska/-cka forms."""
    return [(s + "i", s + "a") for s in stems]


_CULTURES: list[_Pool] = [
    (  # Polish
        ["Zofia", "Agnieszka", "Małgorzata", "Jadwiga", "Bożena", "Halina", "Grażyna",
         "Urszula", "Katarzyna", "Weronika", "Dorota", "Ewelina"],
        ["Tomasz", "Grzegorz", "Wojciech", "Bartłomiej", "Jarosław", "Mirosław",
         "Przemysław", "Łukasz", "Zbigniew", "Radosław", "Kazimierz", "Sławomir"],
        _sky("Wróblewsk", "Zielińsk", "Szczepańsk", "Jabłońsk", "Michalsk", "Ziółkowsk",
             "Dąbrowsk", "Gołębiowsk", "Borkowsk", "Chmielewsk", "Wasilewsk", "Przybylsk",
             "Głowack", "Kwiatkowsk", "Nowick", "Ostrowsk")
        + _same("Kaczmarek", "Pawlak", "Sobczak", "Wieczorek", "Kołodziej", "Mazurek", "Żak",
                "Wilczek"),
    ),
    (  # Czech
        ["Zdeňka", "Radka", "Jitka", "Libuše", "Vlasta", "Hana", "Markéta", "Blanka"],
        ["Radek", "Vojtěch", "Ondřej", "Bohumil", "Přemysl", "Zdeněk", "Luboš", "Kamil"],
        [("Kučera", "Kučerová"), ("Veselý", "Veselá"), ("Horáček", "Horáčková"),
         ("Pokorný", "Pokorná"), ("Pospíšil", "Pospíšilová"), ("Hájek", "Hájková"),
         ("Jelínek", "Jelínková"), ("Růžička", "Růžičková"), ("Šťastný", "Šťastná"),
         ("Vrabec", "Vrabcová"), ("Kříž", "Křížová"), ("Sýkora", "Sýkorová")],
    ),
    (  # Spanish
        ["Ximena", "Itziar", "Maite", "Begoña", "Rocío", "Inmaculada", "Nerea", "Azucena",
         "Consuelo", "Remedios"],
        ["Íñigo", "Joaquín", "Ramiro", "Fermín", "Baltasar", "Gonzalo", "Anselmo", "Teodoro",
         "Eusebio", "Aurelio"],
        _same("Etxeberria", "Villanueva", "Quiñones", "Arrieta", "Bermúdez", "Echegaray",
              "Cifuentes", "Olmedo", "Santamaría", "Peñalosa", "Urquiza", "Montiel",
              "Barrientos", "Galindo", "Iturbe", "Ocaña", "Salcedo", "Valdivia"),
    ),
    (  # Portuguese / Brazilian
        ["Conceição", "Iracema", "Leonor", "Graça", "Luíza", "Rosário", "Benedita", "Jussara"],
        ["Joaquim", "Sebastião", "Valdemar", "Gustavo", "Aurélio", "Osvaldo", "Cândido",
         "Lourenço"],
        _same("Figueiredo", "Magalhães", "Sampaio", "Gusmão", "Brandão", "Quintela",
              "Albuquerque", "Caldeira", "Peixoto", "Cordeiro", "Bettencourt", "Rebelo",
              "Assunção", "Valadares"),
    ),
    (  # German
        ["Gudrun", "Hildegard", "Wiebke", "Annegret", "Liesel", "Friederike", "Rosemarie",
         "Sieglinde", "Ulrike", "Henrike"],
        ["Anselm", "Jürgen", "Wolfram", "Gebhard", "Ludger", "Hartmut", "Detlef", "Reinhold",
         "Volker", "Eckhard"],
        _same("Kreutzer", "Großmann", "Hoffstätter", "Brückner", "Weißenborn", "Eichhorn",
              "Oberländer", "Pfannkuch", "Zeisig", "Rößler", "Dannecker", "Strobel",
              "Vogelsang", "Hagedorn", "Mühlberg", "Fröhlich"),
    ),
    (  # French
        ["Solène", "Maëlle", "Ghislaine", "Bérénice", "Apolline", "Clémence", "Héloïse",
         "Mireille", "Sidonie", "Capucine"],
        ["Aurélien", "Gaspard", "Thibault", "Anatole", "Baptiste", "Lucien", "Rémi",
         "Théophane", "Yannick", "Barnabé"],
        _same("Lefebvre", "Marchand", "Beaulieu", "Roussel", "Lemaître", "Carpentier",
              "Fontaine", "Chevalier", "Bonnefoy", "Vasseur", "Périer", "Duval", "Brassac",
              "Tessier", "Garnier", "Lécuyer"),
    ),
    (  # Italian
        ["Ginevra", "Benedetta", "Ottavia", "Loredana", "Fiorella", "Annunziata",
         "Costanza", "Rosalba"],
        ["Ottavio", "Gianfranco", "Ludovico", "Ercole", "Sandro", "Tommaso", "Raffaele",
         "Corrado"],
        _same("Bellandi", "Castagnoli", "Ferrandino", "Gualtieri", "Lombardozzi",
              "Quaranta", "Sartori", "Tedeschi", "Vercelli", "Abbruzzese", "Bonfiglio",
              "Capuano", "Nardini", "Spadaro", "Zanella", "Sgarbossa"),
    ),
    (  # Dutch
        ["Femke", "Marieke", "Sanne", "Wilhelmina", "Geertje", "Lieke"],
        ["Joost", "Maarten", "Sjoerd", "Bram", "Wouter", "Gijs"],
        _same("van der Heijden", "Bosman", "Kuipers", "Dekker", "Brouwer", "Hoekstra",
              "Smeets", "Terpstra", "van Houten", "Veldkamp"),
    ),
    (  # Scandinavian
        ["Sigrún", "Ingeborg", "Åsa", "Solveig", "Ragnhild", "Kerstin", "Tuva", "Siv"],
        ["Leif", "Torbjørn", "Håkon", "Eskil", "Sverre", "Øyvind", "Gunnar", "Anders"],
        _same("Lindqvist", "Bergström", "Halvorsen", "Sæther", "Nyström", "Sandvik",
              "Åkerlund", "Fjeldstad", "Løvland", "Engström", "Hjelm", "Mikkelsen"),
    ),
    (  # Hungarian (given name first, as usually written in English)
        ["Erzsébet", "Zsófia", "Réka", "Ildikó", "Enikő", "Boglárka"],
        ["Gergely", "Bálint", "Csaba", "Zoltán", "Levente", "Dezső"],
        _same("Fehérvári", "Bodnár", "Takács", "Halász", "Lengyel", "Vörös", "Szűcs",
              "Pálfi"),
    ),
    (  # Turkish
        ["Şebnem", "Gülşen", "Nilüfer", "Özlem", "Elif", "Derya"],
        ["Çağlar", "Oğuz", "Barış", "Tarık", "Ümit", "Serkan"],
        _same("Yıldırım", "Öztürk", "Aydın", "Çelik", "Güneş", "Korkmaz", "Erdem",
              "Karataş", "Akgül"),
    ),
    (  # English / Irish
        ["Philippa", "Rosalind", "Imogen", "Harriet", "Niamh", "Siobhan", "Gwendolyn",
         "Beatrix"],
        ["Cormac", "Ambrose", "Rupert", "Declan", "Percival", "Barnaby", "Fergus", "Tobias"],
        _same("Ashworth", "Pemberton", "Fairweather", "Whitcombe", "Thistlewood",
              "Hargreaves", "McAllister", "Blackwood", "Cartwright", "Kilbride",
              "Penhaligon", "Merriweather", "Dunmore", "Fenwick", "Greenhalgh"),
    ),
    (  # Japanese (romanised, given name first)
        ["Haruka", "Sayuri", "Chiaki", "Natsumi", "Kaori", "Emiko"],
        ["Kenta", "Daisuke", "Takumi", "Shinji", "Ryota", "Hiroki"],
        _same("Watanabe", "Takahashi", "Matsumoto", "Hayashi", "Inoue", "Kimura",
              "Fujimoto", "Okada", "Morimoto", "Nakagawa"),
    ),
    (  # Greek
        ["Eleftheria", "Chrysoula", "Kalliopi", "Despina"],
        ["Stavros", "Panagiotis", "Evangelos", "Dimitrios"],
        [("Papadakis", "Papadaki"), ("Karagiannis", "Karagianni"),
         ("Antonopoulos", "Antonopoulou"), ("Vlachos", "Vlachou"),
         ("Stathopoulos", "Stathopoulou"), ("Konstantinidis", "Konstantinidou"),
         ("Mavridis", "Mavridou")],
    ),
]


def _all_names() -> list[tuple[str, str, str]]:
    """Every (first name, surname, family) the pools can form, in a fixed order.

    ``family`` is the masculine surname, so that "Borkowski" and "Borkowska"
    count as one surname when spreading names out.
    """
    seen: set[str] = set()
    names: list[tuple[str, str, str]] = []
    for female, male, surnames in _CULTURES:
        triples = [(f, fem, masc) for f in female for masc, fem in surnames]
        triples += [(m, masc, masc) for m in male for masc, _ in surnames]
        for first, last, family in triples:
            full = f"{first} {last}"
            if full not in seen:
                seen.add(full)
                names.append((first, last, family))
    return names


_NAMES: list[tuple[str, str, str]] = _all_names()


def _spread(names: list[tuple[str, str, str]]) -> list[str]:
    """Reorder so that first names and surnames repeat as late as possible.

    MEMIT keys an edit on the subject's last token, so "Tarık Çelik" and
    "Serkan Çelik" in one small benchmark would compete for nearly the same key
    and make results depend on the seed. In round r we take, in the given order,
    every remaining name whose first name and surname have each been used at
    most r times; round 0 therefore repeats neither.
    """
    uses: dict[str, int] = {}
    remaining = list(names)
    out: list[str] = []
    r = 0
    while remaining:
        rest = []
        for first, last, family in remaining:
            if uses.get("F" + first, 0) <= r and uses.get("S" + family, 0) <= r:
                uses["F" + first] = uses.get("F" + first, 0) + 1
                uses["S" + family] = uses.get("S" + family, 0) + 1
                out.append(f"{first} {last}")
            else:
                rest.append((first, last, family))
        remaining = rest
        r += 1
    return out


def max_people() -> int:
    """How many distinct names :func:`fictional_people` can return."""
    return len(_NAMES)


def _randbelow(rng: random.Random, n: int) -> int:
    # Built on random() alone, whose output Python keeps stable across versions.
    return min(int(rng.random() * n), n - 1)


def _shuffled(items: list, rng: random.Random) -> list:
    """Fisher-Yates shuffle driven by ``_randbelow``; returns a new list."""
    out = list(items)
    for i in range(len(out) - 1, 0, -1):
        j = _randbelow(rng, i + 1)
        out[i], out[j] = out[j], out[i]
    return out


def fictional_people(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct invented full names, deterministic in ``(n, seed)``.

    The result for a smaller ``n`` is a prefix of the result for a larger one
    with the same seed, so growing a benchmark keeps its earlier subjects.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if n > len(_NAMES):
        raise ValueError(f"can make at most {len(_NAMES)} distinct names, asked for {n}")
    rng = random.Random(seed)
    return _spread(_shuffled(_NAMES, rng))[:n]


def fictional_facts(n_subjects: int, relations_per_subject: int = 1, seed: int = 0) -> list[Fact]:
    """Facts about ``n_subjects`` invented people, ``relations_per_subject`` each.

    Facts come grouped by subject, in the order of :func:`fictional_people`.
    A subject's relations are distinct, so no two facts share a key (a later
    fact with the same key would overwrite an earlier one). Objects are drawn
    independently per fact, so different people may share an object.
    """
    if not 0 <= relations_per_subject <= len(RELATIONS):
        raise ValueError(
            f"relations_per_subject must be between 0 and {len(RELATIONS)}, got {relations_per_subject}"
        )
    people = fictional_people(n_subjects, seed)
    # A separate stream from the one that chose the names, so that changing
    # relations_per_subject does not reshuffle who the subjects are.
    rng = random.Random(seed * 1_000_003 + 7_919)
    facts: list[Fact] = []
    for person in people:
        rel_idx = _shuffled(list(range(len(RELATIONS))), rng)[:relations_per_subject]
        for i in rel_idx:
            relation, template, pool = RELATIONS[i]
            obj = pool[_randbelow(rng, len(pool))]
            facts.append(Fact(person, relation, obj, template.format(s=person)))
    return facts


SHORT_NAMES = ("Tom", "Bob", "Anna", "Mary", "John", "Paul", "Max", "Sam", "Peter", "Maria", "David", "Jack",
               "Ben", "Mark", "Sarah", "James")
"""People named by one common first name, each a single token on the default model: the
subjects whose raw prompt starts at the token every text reads alike (`inference.lead_in`)."""


def lifelong_facts(n: int, seed: int = 0, attributes: tuple[int, int] = (4, 6), spread: int = 100,
                   people: tuple[str, ...] | None = None) -> list[Fact]:
    """The first ``n`` facts told about invented people over a long time, in the order told.

    Each person has ``attributes[0]`` to ``attributes[1]`` facts with distinct relations
    (drawn from all of :data:`RELATIONS`, so fact sets differ in kind as well as in names).
    Their facts do not come together: person ``i`` turns up at time ``i * attributes[0]``
    and each of their facts at a uniformly random time up to ``spread`` later, so people
    interleave and a later fact about someone often arrives after the earlier ones were
    slept on, as in use. The list for a smaller ``n`` is a prefix of the list for a
    larger one with the same other arguments, so checkpoints of a short run are those of
    a long one. Deterministic in its arguments. ``people``: these names, shuffled, instead
    of invented full names (``SHORT_NAMES``, say).
    """
    lo, hi = attributes
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if not 1 <= lo <= hi <= len(RELATIONS):
        raise ValueError(f"attributes must be (lo, hi) with 1 <= lo <= hi <= {len(RELATIONS)}, got {attributes}")
    if spread < 0:
        raise ValueError(f"spread must be non-negative, got {spread}")
    # The first ceil(n / lo) people have at least n facts, all told before `horizon`; a
    # person who turns up after it cannot be among the first n facts.
    horizon = -(-n // lo) * lo + spread
    needed = -(-horizon // lo) if n else 0
    names = max_people() if people is None else len(people)
    if needed > names:
        raise ValueError(f"{n} facts need {needed} people; there are {names} names")
    people = fictional_people(needed, seed) if people is None else _shuffled(list(people), random.Random(seed))[:needed]
    # A stream of its own, drawn person by person: more people leave earlier ones alone.
    rng = random.Random(seed * 1_000_003 + 104_729)
    timed: list[tuple[float, int, int, Fact]] = []
    for i, person in enumerate(people):
        k = lo + _randbelow(rng, hi - lo + 1)
        for j, r in enumerate(_shuffled(list(range(len(RELATIONS))), rng)[:k]):
            relation, template, pool = RELATIONS[r]
            obj = pool[_randbelow(rng, len(pool))]
            when = i * lo + rng.random() * spread
            timed.append((when, i, j, Fact(person, relation, obj, template.format(s=person))))
    timed.sort(key=lambda t: t[:3])
    return [t[3] for t in timed[:n]]


def changed_facts(facts: list[Fact], n: int, seed: int = 0) -> tuple[list[tuple[Fact, Fact]], list[Fact]]:
    """``n`` updates and ``n`` forgets among ``facts`` (distinct facts, deterministic):
    each update is (old fact, the same subject and relation with another object of the
    relation's pool), each forget a fact to remove. For the lifelong benchmark's
    "updates and forgets keep working at scale"."""
    if not 0 <= 2 * n <= len(facts):
        raise ValueError(f"{n} updates and {n} forgets need at least {2 * n} facts, got {len(facts)}")
    pools = {relation: pool for relation, _, pool in RELATIONS}
    rng = random.Random(seed * 7_919 + 17)
    chosen = _shuffled(list(range(len(facts))), rng)[: 2 * n]
    updates = []
    for i in chosen[:n]:
        old = facts[i]
        others = [o for o in pools.get(old.relation, []) if o != old.object]
        if not others:
            raise ValueError(f"no other object for the relation {old.relation!r}")
        new = others[_randbelow(rng, len(others))]
        updates.append((old, Fact(old.subject, old.relation, new, old.question)))
    return updates, [facts[i] for i in chosen[n:]]
